"""Settled token ids -> text deltas, cut at the first stop string.

A dLLM settles whole blocks; each time more ids settle, the whole id list is decoded again (exactly as
lopa.generate decodes its result) and the new suffix is sent. While the request runs, a trailing U+FFFD
(an incomplete UTF-8 sequence at the block edge) and anything that could still become a stop string are
held back, so the concatenated deltas equal the final text.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class TextStream:
    def __init__(self, tokenizer, stops: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.ids: list[int] = []
        self.sent = ""  # text already handed out
        self.stopped = False  # a stop string was seen: nothing more is sent

    def _cut(self, text: str) -> str:
        """Text before the earliest stop string (sets stopped when one occurs)."""
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return text[:min(hits)]
        return text

    def _hold(self, text: str) -> int:
        """How many trailing characters of an unfinished text may still change or start a stop string."""
        held = len(text) - len(text.rstrip(REPLACEMENT))
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:n]):
                    held = max(held, n)
                    break
        return held

    def push(self, new_ids: list[int], finished: bool) -> str:
        """The next delta after ``new_ids`` settled ("" when nothing new can be sent yet)."""
        if self.stopped:
            return ""
        self.ids.extend(new_ids)
        text = self._cut(self.tokenizer.decode(self.ids))
        if not (finished or self.stopped):
            text = text[:len(text) - self._hold(text)]
        if not text.startswith(self.sent):  # a decode that rewrote earlier text: send only what is new
            text = self.sent + text[len(self.sent):]
        delta = text[len(self.sent):]
        self.sent = text
        return delta

    @property
    def text(self) -> str:
        return self.sent
