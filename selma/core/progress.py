"""One progress reporter for every stage: a bar on a terminal, log lines otherwise.

Messages (``progress("[train] expert coco done")``) go to the sink as they come. Counters
(``progress.counter("images", total=120, unit="images")``) are updated with the number done so
far; on a terminal each is a tqdm bar, elsewhere (Ray job logs, CI, a file) a line such as
``[images] 40/120 images (2.31/s, 17s)`` at most every ``interval_s`` seconds, and a last one
when the counter closes.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Callable

from tqdm import tqdm


class Counter:
    def __init__(self, progress: "Progress", label: str, total: int | None, unit: str):
        self.progress, self.label, self.total, self.unit = progress, label, total, unit
        self.started = time.monotonic()
        self.done, self.detail = 0, ""
        self._last_line: float | None = None
        self._last_written: tuple[int, str] | None = None
        self._bar = tqdm(total=total, desc=label, unit=f" {unit}", dynamic_ncols=True, leave=True) \
            if progress.interactive else None

    def update(self, done: int, detail: str = "") -> None:
        """``done`` so far (not an increment); ``detail`` is shown after the count (e.g. a loss)."""
        self.done, self.detail = done, detail
        if self._bar is not None:
            self._bar.n = done
            if detail:
                self._bar.set_postfix_str(detail, refresh=False)
            self._bar.refresh()
            return
        now = time.monotonic()
        if self._last_line is None or now - self._last_line >= self.progress.interval_s:
            self._write_line(now)

    def _write_line(self, now: float) -> None:
        self._last_line, self._last_written = now, (self.done, self.detail)
        self.progress(self.line())

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        of_total = f"/{self.total}" if self.total is not None else ""
        detail = f" {self.detail}" if self.detail else ""
        return (f"[{self.label}] {self.done}{of_total} {self.unit}{detail} "
                f"({self.done / max(elapsed, 1e-9):.2f}/s, {elapsed:.0f}s)")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._last_written not in (None, (self.done, self.detail)):
            self._write_line(time.monotonic())  # the final count, unless the last line said it

    def __enter__(self) -> "Counter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Progress:
    """``sink`` receives each message (default: print). ``interactive`` (default: the sink is
    print and stdout is a terminal) draws counters as bars; ``interval_s`` spaces their log lines."""

    def __init__(self, sink: Callable[[str], None] | None = None, *, interactive: bool | None = None,
                 interval_s: float = 10.0):
        self.sink = sink or print
        self.interactive = (sink is None and sys.stdout.isatty()) if interactive is None else interactive
        self.interval_s = interval_s
        self._lock = threading.Lock()

    @classmethod
    def of(cls, progress: "Progress | Callable[[str], None] | None") -> "Progress":
        """A Progress from what callers pass: a Progress, a plain callable (e.g. ``list.append``), or None."""
        if isinstance(progress, Progress):
            return progress
        return cls(None if progress is None or progress is print else progress)

    @property
    def poll_s(self) -> float:
        """How often a stage should look at its work's progress."""
        return 1.0 if self.interactive else self.interval_s

    def __call__(self, message: str) -> None:
        with self._lock:
            if self.interactive:
                tqdm.write(message)
            else:
                self.sink(message)

    def counter(self, label: str, total: int | None = None, unit: str = "items") -> Counter:
        return Counter(self, label, total, unit)
