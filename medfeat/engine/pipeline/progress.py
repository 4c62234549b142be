"""A live progress line (items, items/s, ETA) and per-stage timing totals."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

STAGES = ("read", "preprocess", "infer", "write")


@dataclass
class StageTimes:
    """Seconds per stage, summed over batches (``read``/``preprocess``/``infer`` are worker
    seconds, so with several workers their sum can exceed the wall time)."""

    seconds: dict[str, float] = field(default_factory=lambda: {s: 0.0 for s in STAGES})

    def add(self, timings: dict[str, float]) -> None:
        for k, v in timings.items():
            self.seconds[k] = self.seconds.get(k, 0.0) + float(v)

    def table(self, wall: float, items: int) -> str:
        """A short table: stage, seconds, ms per item, share of the wall time."""
        lines = [f"{'stage':<11}{'seconds':>9}{'ms/item':>10}{'% wall':>8}"]
        for stage in STAGES:
            s = self.seconds.get(stage, 0.0)
            per = 1000.0 * s / items if items else 0.0
            lines.append(f"{stage:<11}{s:>9.2f}{per:>10.1f}{100.0 * s / wall if wall else 0.0:>8.0f}")
        lines.append(f"{'wall':<11}{wall:>9.2f}{1000.0 * wall / items if items else 0.0:>10.1f}{100:>8}")
        return "\n".join(lines)


class Progress:
    """``update(n_done, n_failed)`` redraws one line on a terminal; elsewhere it prints at
    most every ``interval`` seconds so logs stay short."""

    def __init__(self, total: int, *, stream: TextIO | None = None, enabled: bool = True,
                 interval: float = 5.0) -> None:
        self.total, self.enabled = total, enabled and total > 0
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = 0.1 if self.tty else interval
        self.start = time.perf_counter()
        self._last = 0.0
        self._shown = -1

    def update(self, done: int, failed: int = 0, *, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        n = done + failed
        if n == self._shown and not self.tty:
            return
        self._shown = n
        elapsed = max(now - self.start, 1e-9)
        rate = n / elapsed
        eta = (self.total - n) / rate if rate > 0 else float("inf")
        width = 24
        fill = int(width * n / self.total)
        bar = "#" * fill + "-" * (width - fill)
        text = (f"[{bar}] {n}/{self.total} items, {failed} failed, {rate:.2f} items/s, "
                f"ETA {_clock(eta)}")
        self.stream.write(("\r" + text) if self.tty else text + "\n")
        self.stream.flush()

    def close(self, done: int, failed: int) -> None:
        self.update(done, failed, force=True)
        if self.enabled and self.tty:
            self.stream.write("\n")


def _clock(seconds: float) -> str:
    if seconds == float("inf"):
        return "--:--"
    m, s = divmod(int(seconds + 0.5), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"
