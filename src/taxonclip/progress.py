"""Progress on stderr: a tqdm bar on a terminal; elsewhere (a log file, CI, `nohup`) plain lines,
one every `every` updates (or every PLAIN_LINE_SECONDS) and one at the end, since a bar redrawn
with carriage returns turns a log into one unreadable line."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

PLAIN_LINE_SECONDS = 30.0


def on_terminal() -> bool:
    """Whether stderr is a terminal (then progress is a redrawn bar)."""
    return sys.stderr.isatty()


def say(line: str) -> None:
    """Print one progress line on stderr, above any bar that is drawn."""
    tqdm.write(line, file=sys.stderr)


class Progress:
    """Counts `total` units of work under the name `desc`; `show=False` keeps it silent (ranks
    other than 0, a caller that asked for no progress). Off a terminal, a line is printed every
    `every` units, or where `every` is None every PLAIN_LINE_SECONDS, and at the end unless
    `last_line=False` (a caller that prints its own summary)."""

    def __init__(self, total: int, desc: str, unit: str, *, show: bool = True,
                 every: int | None = None, last_line: bool = True) -> None:
        self.total, self.desc, self.unit, self.last_line_wanted = total, desc, unit, last_line
        self.show, self.every, self.done, self.values = show, every, 0, ""
        self.start = self.last_line = time.monotonic()
        self.printed = 0
        self.bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr,
                        disable=not (show and on_terminal()))

    def update(self, count: int = 1) -> None:
        """Count `count` more units, and print a line when one is due."""
        before, self.done = self.done, self.done + count
        self.bar.update(count)
        if not self._plain:
            return
        if self.every is not None:
            due = self.done // self.every > before // self.every
        else:
            due = time.monotonic() - self.last_line >= PLAIN_LINE_SECONDS
        if due:
            self._line()

    def note(self, **values: str) -> None:
        """Show `values` (loss, lr, img/s) beside the count from now on."""
        self.values = ", ".join(f"{key} {value}" for key, value in values.items())
        self.bar.set_postfix_str(self.values)

    def close(self) -> None:
        """End the bar; off a terminal, print the last count unless it was just printed."""
        self.bar.close()
        if self._plain and self.last_line_wanted and self.done > self.printed:
            self._line(f" in {self.seconds:.1f} s")

    @property
    def seconds(self) -> float:
        """Seconds since the count began."""
        return time.monotonic() - self.start

    @property
    def _plain(self) -> bool:
        return self.show and not on_terminal()

    def _line(self, elapsed: str = "") -> None:
        values = f": {self.values}" if self.values else ""
        say(f"{self.desc}: {self.done}/{self.total} {self.unit}{elapsed}{values}")
        self.printed, self.last_line = self.done, time.monotonic()
