"""Reading an LLM judge's reply: which of two responses it prefers, and the score it gives.

A judge asked for "one letter, A or B" or "the number only" answers in prose as often as not:
"It is a close call, but B is better.", "**Verdict: [[A]]**", "On a scale of 1 to 10: 7". So the
parsers look for explicit statements, never for stray letters or numbers:

* A *label* is how a reply names a response: "Response B", "Assistant A", "(B)", "[B]", "'A'",
  "the second answer", or a bare letter. A bare "a" that reads as the English article ("a close
  call", "A good answer") is no label: a letter is one only when it ends its clause or the next
  word is a verb or connective ("A is better", "A, because", "A and B").
* A *statement* gives a verdict: a final-verdict marker (MT-Bench's "[[A]]", "[[B]]", "[[C]]" for a
  tie), a declaration ("Verdict: A", "The better response is B", "Overall, B."), a comparison
  ("B is better than A", "A is worse", "I prefer B", "B wins", "A > B"), a tie ("it's a tie",
  "equally good", "neither"), a label closing a line on its own ("Both have flaws. B."), or a
  label opening the reply ("B, because it cites its source": the one letter asked for, then an
  explanation nobody asked for).
* Statements rank by how explicit they are (marker, then declaration, then the rest); the verdict
  is the *last* statement of the highest rank present, since judges reason first and conclude
  last. No statement, no verdict: None, never a guess.

Scores follow the same plan: "[[7]]", then "7/10" / "7 out of 10", then a score word or the scale
itself followed by the number ("Score: 7", "Rating: 7.5", "I'd give it a 7", "On a scale of 1 to
10: 7"), then a number closing a line on its own ("Looks right. 8"). A range or hedge ("7-8",
"7 or 8") is no score, and a score outside the scale is None, not clipped.
"""

from __future__ import annotations

import re
from typing import Literal

Verdict = Literal["A", "B", "tie"]

_MARKDOWN = re.compile(r"[*_`#]+")
_NOUN = r"(?:response|answer|assistant|option|output|model|candidate|completion|reply|summary|solution|choice)"
# words that may follow a label but never the article "a" (verbs, connectives)
_PREDICATE = (r"(?:is|was|seems|appears|looks|wins|won|beats|outperforms|edges|has|does|did|provides|gives|"
              r"offers|answers|addresses|follows|gets|remains|performs|would|should|could|might|and|or|nor|"
              r"vs|versus|over|than|because|since|but|whereas)")
_LETTER = (rf"(?<![\w'’.-])(?:B|A(?![ \t]+(?!{_PREDICATE}\b)[^\W\d_]))(?:['’]s)?(?![\w'’-]|\.\w)")
_LABEL = (rf"(?:{_NOUN}\s*\(?\s*[AB]\s*\)?(?:['’]s)?(?![\w'’-])"  # Response B, Assistant (A)
          rf"|\[\s*[AB]\s*\]|\(\s*[AB]\s*\)|\"\s*[AB]\s*\"|'\s*[AB]\s*'|“\s*[AB]\s*”"  # [B] (A) "B"
          rf"|(?:the\s+)?(?:first|second)\s+(?:one|{_NOUN})|the\s+(?:former|latter)"  # the second answer
          rf"|{_LETTER})")
_ADVERBS = (r"(?:(?:clearly|slightly|much|far|way|definitely|certainly|obviously|surely|significantly|"
            r"marginally|somewhat|overall|still|also|arguably|generally|noticeably|considerably|substantially|probably|"
            r"a\s+bit|a\s+little|by\s+far)\s+)*")
_QUALITY = (r"(?:helpful|accurate|correct|complete|relevant|useful|informative|clear|concise|precise|"
            r"thorough|detailed|appropriate|coherent|faithful|comprehensive)")
_BETTER = (rf"(?:better|superior|preferable|preferred|stronger|clearer|best|ahead|more\s+{_QUALITY}|"
           rf"the\s+(?:clear\s+)?(?:better|stronger|best|winner|superior|preferred)(?:\s+(?:one|{_NOUN}))?)")
_WORSE = (rf"(?:worse|weaker|inferior|less\s+{_QUALITY}|"
          rf"the\s+(?:worse|weaker|inferior)(?:\s+(?:one|{_NOUN}))?)")
_BE = r"(?:(?:is|was|seems|appears|looks|remains|would\s+be|seems\s+to\s+be)\s+)?"
_OWNER = rf"(?:(?:['’]s\s+)?(?:{_NOUN}|one)\s+)?"  # "Assistant B's answer is better"
_END = r"(?=\s*(?:[.!;,:\n)]|$))"  # the clause ends here


def _x(name: str) -> str:
    return f"(?P<{name}>{_LABEL})"


_MARKER = re.compile(r"\[\[\s*(?P<v>A|B|C|tie)\s*\]\]", re.IGNORECASE)
_DECLARATIONS = [
    rf"\b(?:final\s+)?(?:verdict|answer|decision|choice|winner|pick|selection|preference|judge?ment|conclusion|"
    rf"result|(?:better|best|preferred|stronger|winning)\s+(?:one|{_NOUN})|more\s+{_QUALITY}\s+(?:one|{_NOUN}))"
    rf"\s*(?:is|would\s+be|:|=|-|—|–)\s*{_ADVERBS}{_x('x')}",
    rf"\b(?:overall|in\s+conclusion|in\s+summary|therefore|thus|hence|so|finally)\s*[,:\-]?\s*{_x('x')}{_END}",
]
_COMPARISONS = [  # (pattern, which side wins)
    (rf"{_x('x')}\s*{_OWNER}{_BE}{_ADVERBS}{_BETTER}(?:\s+than\s+{_x('y')})?", "x"),
    (rf"{_x('x')}\s*{_OWNER}{_BE}{_ADVERBS}{_WORSE}(?:\s+than\s+{_x('y')})?", "not x"),
    (rf"{_x('x')}\s*{_OWNER}(?:is\s+)?not\s+as\s+(?:good|{_QUALITY}|strong)\s+as\s+{_x('y')}", "y"),
    (rf"{_x('x')}\s+{_ADVERBS}(?:wins|won|beats|outperforms|prevails|edges\s+out)", "x"),
    (rf"\b(?:I|we)\s*(?:would\s+|['’]d\s+|will\s+|['’]ll\s+)?{_ADVERBS}(?:choose|chose|pick|prefer|select|"
     rf"go\s+with|vote\s+for|favou?r|recommend|side\s+with|lean\s+towards?|say|think|believe)\s+"
     rf"(?:that\s+|it['’]?s\s+|it\s+is\s+)?{_x('x')}", "x"),
    (rf"{_x('x')}\s*(?:>+|≫)\s*{_x('y')}", "x"),
    (rf"{_x('x')}\s*(?:<+|≪)\s*{_x('y')}", "y"),
    (rf"(?:^|[.!?:])[ \t]*{_ADVERBS}{_x('x')}[ \t]*[.!]?[ \t]*$", "x"),  # a label closing a line on its own
    (rf"\A\s*{_x('x')}\s*(?:[.,!)\n]|$|[-–—]\s|\s+(?:because|since|as)\b)", "x"),  # a reply opening with one
]
_TIES = [
    rf"{_x('x')}\s*(?:=+|≈)\s*{_x('y')}",
    r"\b(?:it['’]?s\s+a\s+|a\s+)?(?:tie|draw)\b",
    r"\A\W*(?:equal|the\s+same|same|both)\W*\Z",
    r"\bequally\s+(?:good|bad|helpful|strong|weak|correct|valid|poor|useful|accurate|matched)\b",
    r"\b(?:both|they)\s+(?:responses\s+|answers\s+)?(?:are|seem|look)\s+(?:equally|equal|comparable|on\s+par|"
    r"(?:about\s+|roughly\s+)?the\s+same|similar(?:ly)?)\b",
    rf"\bneither\b(?=\s*(?:[.!,;:\n]|$|{_NOUN}|one|of\s+them|is|{_LABEL}))",
    rf"\bno\s+(?:clear\s+)?(?:winner|preference|difference|(?:better|clear)\s+(?:one|{_NOUN}))\b",
]

_FLAGS = re.IGNORECASE | re.MULTILINE
_DECLARATION_RE = [re.compile(p, _FLAGS) for p in _DECLARATIONS]
_COMPARISON_RE = [(re.compile(p, _FLAGS), side) for p, side in _COMPARISONS]
_TIE_RE = [re.compile(p, _FLAGS) for p in _TIES]


def _side(label: str) -> Verdict:
    """A or B from a label's text."""
    low = label.lower()
    if re.search(r"\b(?:first|former)\b", low):
        return "A"
    if re.search(r"\b(?:second|latter)\b", low):
        return "B"
    return re.findall(r"(?<![a-z])([ab])(?![a-z])", low)[-1].upper()  # type: ignore[return-value]


def _other(side: Verdict) -> Verdict:
    return "B" if side == "A" else "A"


def parse_verdict(reply: str | None) -> Verdict | None:
    """"A", "B", "tie", or None when the reply states no verdict."""
    if not reply:
        return None
    text = _MARKDOWN.sub("", reply)
    markers = list(_MARKER.finditer(text))
    if markers:
        v = markers[-1].group("v").upper()
        return "tie" if v in ("C", "TIE") else v  # type: ignore[return-value]
    found: list[tuple[int, Verdict]] = []
    for rx in _DECLARATION_RE:
        found += [(m.start("x"), _side(m.group("x"))) for m in rx.finditer(text)]
    if found:
        return max(found)[1]
    for rx, side in _COMPARISON_RE:
        for m in rx.finditer(text):
            if side == "x":
                found.append((m.start(), _side(m.group("x"))))
            elif side == "not x":
                found.append((m.start(), _other(_side(m.group("x")))))
            else:
                found.append((m.start(), _side(m.group("y"))))
    for rx in _TIE_RE:
        found += [(m.start(), "tie") for m in rx.finditer(text)]
    return max(found)[1] if found else None


def verdict(reply: str | None) -> Literal["A", "B"] | None:
    """The preferred response, "A" or "B"; None for a tie or when no verdict is stated."""
    v = parse_verdict(reply)
    return None if v == "tie" else v


_NUM = r"(?<![\w.])(?P<n>-?\d+(?:\.\d+)?)(?![\w%]|\.\d)"
# a scale or range is no score: "on a scale of 1 to 10" becomes the keyword "scale", "7-8" a hedge
_SCALE = re.compile(r"(?:on\s+)?(?:a\s+)?scale\s+(?:of\s+|from\s+)?\d+\s*(?:to|-|–)\s*\d+", re.IGNORECASE)
_RANGE = re.compile(r"(?:\bfrom\s+)?\d+(?:\.\d+)?\s*(?:-|–|to)\s*\d+(?:\.\d+)?(?![\w.])", re.IGNORECASE)
_HEDGE = re.compile(r"\s*(?:or|and)\s*-?\d", re.IGNORECASE)  # "7 or 8": no single score
_FRACTION = re.compile(r"\s*(?:/|out\s+of)\s*\d", re.IGNORECASE)
_SCORE_RE = [  # by rank; the score is the last match of the first rank that matches
    re.compile(rf"\[\[\s*{_NUM}\s*\]\]"),
    re.compile(rf"{_NUM}\s*(?:/|out\s+of)\s*(?P<d>\d+)(?![\w%]|\.\d)", re.IGNORECASE),  # "8/10." ends a sentence
    re.compile(rf"(?:\b(?:score|rating|grade|mark|scale)\b|\b(?:rate|give)\b)[^\d\n]{{0,30}}?{_NUM}",
               re.IGNORECASE),
    re.compile(rf"(?:^|[.!?:])[^\w\n]*{_NUM}[^\w\n]*$", re.MULTILINE),  # a number closing a line on its own
]


def judge_score(reply: str | None, low: float = 1, high: float = 10) -> float | None:
    """The score a judge reply gives on the scale [low, high] (an int when whole), else None."""
    if not reply:
        return None
    text = _RANGE.sub(" range ", _SCALE.sub(" scale ", _MARKDOWN.sub("", reply)))
    for rank, rx in enumerate(_SCORE_RE):
        found = []
        for m in rx.finditer(text):
            if rank == 1:
                if float(m.group("d")) != high:
                    continue  # a fraction of something else ("3/4 of the tests")
            elif _FRACTION.match(text, m.end("n")):
                continue  # "Score: 4/5" is on another scale
            if _HEDGE.match(text, m.end("n")):
                continue
            found.append((m.start("n"), float(m.group("n"))))
        if found:
            value = max(found)[1]
            if not low <= value <= high:
                return None
            return int(value) if value.is_integer() else value
    return None
