"""Stop sequences over streamed text.

Text that might be the start of a stop sequence is held back until the next piece shows
whether it is, so a client never sees half of a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopScanner:
    """Feed decoded text; get back what is safe to emit and whether a stop sequence hit."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Return the text that can be sent now; set ``stopped`` when a stop sequence appears."""
        if not self._stops:
            return text
        buf = self._held + text
        first = -1
        for s in self._stops:
            i = buf.find(s)
            if i != -1 and (first == -1 or i < first):
                first = i
        if first != -1:
            self._held = ""
            self.stopped = True
            return buf[:first]
        keep = self._longest_partial(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """The held-back text, at the end of a generation that hit no stop sequence."""
        out, self._held = self._held, ""
        return out

    def _longest_partial(self, buf: str) -> int:
        # The longest suffix of buf that is a proper prefix of some stop sequence.
        best = 0
        for s in self._stops:
            for n in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:n]):
                    best = n
                    break
        return best
