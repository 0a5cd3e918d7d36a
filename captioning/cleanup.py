"""Caption cleanup: VLM chatter in, a caption out (a pure function, no model).

VLMs asked to "describe this image" open with boilerplate ("The image shows ...", "In this picture,
there is ...") that says nothing about the image and would teach the text encoders a constant
prefix, and `max_new_tokens` cuts the last sentence mid-way. `clean_caption` removes both, plus chat
artefacts ("ASSISTANT:"), and returns None when nothing usable is left (the captioner then falls back
to the original caption).
"""

from __future__ import annotations

import re

# Fewer letters than this is no caption ("A", "Ok"): the caller falls back to the original.
MIN_LETTERS = 3

_NOUN = r"(?:image|picture|photo|photograph|pic|scene|illustration|painting|drawing|artwork|graphic|render|rendering|screenshot|frame)"  # noqa: E501
_VERB = (r"(?:shows|showcases|depicts|features|displays|presents|captures|portrays|illustrates|contains|"
         r"is\s+of|is(?=\s+(?:a|an|the)\b))")
_SEE = r"(?:there\s+(?:is|are)|we\s+(?:can\s+)?see|you\s+(?:can\s+)?see|i\s+(?:can\s+)?see|one\s+can\s+see)"

# Openings removed (case-insensitive) from the start, repeatedly, until none matches. Each ends before
# the content; what is left starts with the subject ("a red circle ...").
_OPENINGS = [re.compile(p, re.IGNORECASE) for p in (
    r"^(?:user|assistant|answer|caption|description|gpt|bot)\s*:",  # chat-template role names
    r"^(?:sure|certainly|of\s+course|okay|ok)\s*[!,.]",  # "Sure! The image shows ..."
    rf"^(?:here\s+is|this\s+is|it\s+is|it's)\s+(?:a|an|the)\s+(?:[\w-]+\s+)?{_NOUN}\s+(?:of|showing|depicting)\b",
    rf"^(?:the|this|that|an?)\s+(?:[\w-]+\s+)?{_NOUN}\s+{_VERB}(?:\s+that)?\b",  # "The black-and-white photo shows"
    rf"^(?:in|within|on)\s+(?:the|this)\s+{_NOUN}\s*,?\s*(?:{_SEE}\b)?",  # "In this picture, there is"
    rf"^{_SEE}\b",  # what "In this image we can see" leaves when its comma split it
)]
_ROLE = re.compile(r"\b(?:ASSISTANT|Assistant)\s*:")
# Punctuation left dangling at either end after cuts ("In this image, a dog" -> ", a dog").
_LEADING_JUNK = re.compile(r"^[\s,:;.\-–—]+")
_TRAILING_JUNK = re.compile(r"[\s,:;\-–—]+$")
# A sentence end: . ! ? (plus closing quotes or brackets) followed by whitespace or the end of the text.
_SENTENCE_END = re.compile(r"[.!?][\"'”’)\]]*(?=\s|$)")
# Words whose trailing period is no sentence end.
_ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "st", "vs", "etc", "e.g", "i.e", "no", "jr", "sr", "approx"})


def clean_caption(text: str | None) -> str | None:
    """The caption in `text`, or None when nothing usable remains.

    Steps, in order: collapse whitespace; strip chat artefacts and boilerplate openings (repeatedly,
    case-insensitive); drop an unfinished trailing sentence (keep up to the last sentence end when
    one exists and what it keeps is usable; text without any sentence end is kept as is); strip
    dangling punctuation; capitalise the first letter unless the first word has capitals of its own
    ("iPhone"). None when fewer than MIN_LETTERS letters are left.
    """
    if text is None:
        return None
    text = " ".join(text.split())
    text = _ROLE.split(text)[-1]  # an echoed prompt: keep what follows the last "ASSISTANT:"
    text = _strip_openings(text)
    text = _drop_unfinished_sentence(text)
    text = _TRAILING_JUNK.sub("", text)
    if sum(c.isalpha() for c in text) < MIN_LETTERS:
        return None
    first = text.split(" ", 1)[0]
    if first[:1].islower() and first == first.lower():
        text = text[0].upper() + text[1:]
    return text


def _strip_openings(text: str) -> str:
    while True:
        before = text
        for pattern in _OPENINGS:
            text = _LEADING_JUNK.sub("", pattern.sub("", text, count=1))
        if text == before:
            return text


def _drop_unfinished_sentence(text: str) -> str:
    ends = [m.end() for m in _SENTENCE_END.finditer(text) if not _is_abbreviation(text, m.start())]
    if not ends or ends[-1] == len(text):
        return text  # finished, or one unfinished sentence: better than nothing
    kept = text[:ends[-1]]
    # "Yes. A red car parked next to a" -> "Yes." would be worse than the whole text
    return kept if sum(c.isalpha() for c in kept) >= MIN_LETTERS else text


def _is_abbreviation(text: str, dot: int) -> bool:
    if text[dot] != ".":
        return False
    word = text[:dot].rsplit(" ", 1)[-1].lower()
    return word in _ABBREVIATIONS
