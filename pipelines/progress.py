"""Progress with rate and ETA on stderr, for long work (synth, prepare, ...).

On a terminal one line is redrawn; otherwise (logs, CI, DVC) a line is printed at most every
`every` seconds and at the end, so logs stay short.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Call with (done, total) after each item; `label` names the work."""

    def __init__(self, label: str, *, stream: TextIO | None = None, every: float = 5.0) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.every = every
        self.start = time.monotonic()
        self.last = self.start
        self.tty = self.stream.isatty()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        finished = done >= total
        if not finished and now - self.last < (0.2 if self.tty else self.every):
            return
        self.last = now
        elapsed = now - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else float("inf")
        pct = 100.0 * done / total if total else 100.0
        text = (f"{self.label}: {done}/{total} ({pct:.0f}%) {rate:.1f}/s "
                + (f"ETA {eta:.0f}s" if not finished else f"done in {elapsed:.1f}s"))
        if self.tty:
            self.stream.write("\r" + text + ("\n" if finished else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
