"""The plain-text markers of Mini-Gemini's any-to-any generation (no new vocabulary).

A user turn ending in ``<GEN>`` asks for an image; the model answers with a text-to-image
prompt inside ``<h>...</h>``. The last complete span is the prompt; the answer shown to a
user has the markers removed, with the span's words kept readable. ``MarkerFilter`` does
the same removal on streamed text, holding back only what could still become a marker.
"""

from __future__ import annotations

import re

from minigem.data.records import Message
from minigem.errors import DataError

GEN = "<GEN>"
OPEN = "<h>"
CLOSE = "</h>"
MARKERS = (GEN, OPEN, CLOSE)
_OPENING = "([{\"'"  # no space after these when a marker is removed
_CLOSING = ".,;:!?)]}\"'"  # nor before these

# the LAST complete span: an opening marker, then text with no further opening marker
_LAST_SPAN = re.compile(re.escape(OPEN) + r"((?:(?!" + re.escape(OPEN) + r").)*?)" + re.escape(CLOSE),
                        re.DOTALL)


def add_gen_marker(user_text: str) -> str:
    """``user_text`` ending in `` <GEN>`` (unchanged when it already ends so)."""
    text = user_text.rstrip()
    if text.endswith(GEN):
        return text
    return f"{text} {GEN}" if text else GEN


def add_gen_marker_to_messages(messages: list[Message]) -> list[Message]:
    """A copy of ``messages`` whose last user turn ends in ``<GEN>``."""
    out = list(messages)
    for i in range(len(out) - 1, -1, -1):
        if out[i].role == "user":
            out[i] = Message("user", add_gen_marker(out[i].content))
            return out
    raise DataError("the conversation has no user turn to ask for an image in")


def extract_prompt(answer: str) -> str | None:
    """The text of the last complete ``<h>...</h>`` span, stripped; None if there is none.

    An unclosed ``<h>`` (the model ran out of tokens) and an empty or whitespace-only span
    give None. Whitespace inside the prompt is collapsed to single spaces.
    """
    spans = _LAST_SPAN.findall(answer)
    if not spans:
        return None
    prompt = " ".join(spans[-1].split())
    return prompt or None


class MarkerFilter:
    """Removes markers from text that arrives in pieces (a streamed answer).

    ``feed`` returns the text that is safe to show now; ``flush`` returns the rest at the
    end. A removed marker between two words becomes one space, so ``a:<h>red circle</h>``
    reads ``a: red circle``; next to whitespace, an opening bracket or a closing
    punctuation mark it just disappears.
    """

    def __init__(self) -> None:
        self._held = ""  # a tail that may be the start of a marker
        self._last = ""  # the last character emitted
        self._gap = False  # a marker was removed since the last emitted character

    def feed(self, text: str) -> str:
        buf = self._held + text
        out: list[str] = []
        i = 0
        while i < len(buf):
            if buf[i] == "<":
                rest = buf[i:]
                marker = next((m for m in MARKERS if rest.startswith(m)), None)
                if marker is not None:
                    self._gap = True
                    i += len(marker)
                    continue
                if any(m.startswith(rest) for m in MARKERS):  # maybe a marker: wait for more
                    break
            out.append(self._emit(buf[i]))
            i += 1
        self._held = buf[i:]
        return "".join(out)

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "".join(self._emit(c) for c in held)

    def _emit(self, char: str) -> str:
        if char.isspace() and (not self._last or (self._gap and self._last.isspace())):
            return ""  # no leading whitespace; no doubled whitespace where a marker was
        sep = ""
        if (self._gap and self._last and not self._last.isspace() and self._last not in _OPENING
                and not char.isspace() and char not in _CLOSING):
            sep = " "
        self._gap = False
        self._last = char
        return sep + char


def strip_markers(answer: str) -> str:
    """The answer without ``<GEN>``, ``<h>`` and ``</h>`` (span words kept), stripped."""
    f = MarkerFilter()
    return (f.feed(answer) + f.flush()).strip()
