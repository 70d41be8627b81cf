"""Progress over long work: a tqdm bar on a terminal, a plain line now and then in a log, nothing when off.

One mechanism for the library's long loops (the demo's training, `collect_exit_logits`,
`profile_exits`'s rounds), so that a run whose standard error goes to a file (CI, nohup, a
notebook's captured output) is neither silent for minutes nor thousands of lines long: a tqdm bar
there is one line rewritten with carriage returns, or nothing at all when it is off by default.

Progress goes to standard error, as tqdm's bar does, and never through the demo's `log` (print,
standard output): standard output carries the results, which a user may pipe or compare, standard
error the diagnostics; one stream for the bar and the lines lets ``2>/dev/null`` silence both; and a
library call such as `collect_exit_logits` has no `log` to write to.
"""
from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable

__all__ = ["Progress", "progress_default"]

INTERVAL = 10.0  # seconds between two lines in a log, at most: minutes of work in tens of lines

_logger = logging.getLogger("timm_exits")


def progress_default() -> bool:
    """Progress bars by default only where someone watches: standard error is a terminal."""
    return sys.stderr is not None and sys.stderr.isatty()


class Progress:
    """Reports how far one job's loops have come (a training's epochs, a pass over a loader, rounds of timing).

    `show`:

    - True: a tqdm bar where standard error is a terminal, else a plain line on standard error;
    - None (the library's default): the bar on a terminal, else the same lines through the
      ``timm_exits`` logger at INFO, as timm's train.py reports every ``log_interval`` batches: they
      appear where the application logs at INFO (timm's ``setup_default_logging``, or
      ``logging.basicConfig(level=logging.INFO)``) and stay quiet in a script that never asked;
    - False: nothing.

    In a log, a loop's first line comes at its start, the next ones at most once every `interval`
    seconds (the loops of one `Progress` share that pace, so a training's epochs do not each
    start with a line), and one more at the loop's end, when the last one said was not there::

        training baseline: epoch 3/8, batch 40/84 (47%), 95s

    the seconds counting from the `Progress`'s creation. `clock` is read for the pace only
    (``time.monotonic``; a test passes its own).
    """

    def __init__(self, show: bool | None, interval: float = INTERVAL, clock: Callable[[], float] = time.monotonic):
        if show is None:
            self.mode = "bar" if progress_default() else "log"
        elif show:
            self.mode = "bar" if progress_default() else "stderr"
        else:
            self.mode = "off"
        self.interval = interval
        self._clock = clock
        self._start = clock()
        self._last: float | None = None  # when the last line was said

    def __call__(self, iterable: Iterable, desc: str, total: int | None = None, unit: str = "batch") -> Iterable:
        """`iterable`, reporting its position under `desc` (`total`: its length, where ``len()`` cannot tell)."""
        if self.mode == "off":
            return iterable
        if total is None:
            try:
                total = len(iterable)
            except TypeError:  # a generator, a loader of unknown length: the position without a share
                total = None
        if self.mode == "bar":
            from tqdm.auto import tqdm  # lazy: tqdm.auto looks for a notebook on import

            return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False)
        return self._lines(iterable, desc, total, unit)

    def note(self, text: str) -> None:
        """Say `text` once in a log (what is about to run); a terminal's bar carries its own description."""
        if self.mode in ("stderr", "log"):
            self._write(text)

    def _lines(self, iterable: Iterable, desc: str, total: int | None, unit: str):
        said = None
        done = 0
        if self._due():
            said = self._say(desc, done, total, unit)
        for item in iterable:
            yield item
            done += 1
            if self._due():
                said = self._say(desc, done, total, unit)
        if said != done:  # the end, unless its line was just said
            self._say(desc, done, total, unit)

    def _due(self) -> bool:
        return self._last is None or self._clock() - self._last >= self.interval

    def _say(self, desc: str, done: int, total: int | None, unit: str) -> int:
        self._last = now = self._clock()
        where = f"{unit} {done}/{total} ({100 * done // total}%)" if total else f"{unit} {done}"  # rounded down: 100% only at the end
        self._write(f"{desc}, {where}, {now - self._start:.0f}s")
        return done

    def _write(self, line: str) -> None:
        if self.mode == "log":
            _logger.info(line)
            return
        if sys.stdout is not None:
            sys.stdout.flush()  # the demo's own lines wait in standard output's buffer: flushed first, a log of both keeps their order
        print(line, file=sys.stderr, flush=True)
