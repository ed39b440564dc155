"""Progress of long jobs, shown the way the ecosystem shows it: a bar on a terminal, lines elsewhere.

On a terminal a tqdm bar redraws itself in place. Anywhere else (CI, nohup, a log file) those
carriage-return redraws pile up into one unreadable line, so `Progress` prints one plain line
every `every` units instead: position, the scalars it was given, rate, elapsed time and ETA.
`TQDM_DISABLE` silences both. tqdm reads its TQDM_* variables only for the arguments a caller
does not pass (and only once, when tqdm is imported), so a report that passes `disable=` (to
quiet the other processes of a distributed run) reads this one itself, by tqdm's rule.
"""

from __future__ import annotations

import math
import os
import sys
import time
from types import TracebackType
from typing import TextIO

from tqdm.auto import tqdm


def disabled_by_env() -> bool:
    """Whether TQDM_DISABLE is set: tqdm's rule, any non-empty value (even "0") disables."""
    return os.environ.get("TQDM_DISABLE", "") != ""


def interactive(file: TextIO) -> bool:
    """A terminal, or a Jupyter kernel's stream (which says it is no tty, yet redraws bars in place)."""
    return file.isatty() or type(file).__module__.startswith("ipykernel.")


def _scalars(scalars: dict[str, float]) -> dict[str, str]:
    return {k: f"{v:.4g}" for k, v in scalars.items()}


class Progress:
    """`total` units of work (None: unknown), as a tqdm bar on a terminal and plain lines elsewhere.

    Off a terminal a line is printed each time the count crosses a multiple of `every` (default:
    a twentieth of `total`; without a total, every update), when it reaches `total`, and at
    `close` if the count moved since the last line. `disable` turns everything off (processes
    other than the main one); so does TQDM_DISABLE.
    """

    def __init__(self, total: int | None, desc: str, unit: str, *, initial: int = 0, every: int | None = None,
                 disable: bool = False, file: TextIO | None = None):
        self.file = file if file is not None else sys.stderr
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.n0 = self.shown = initial
        self.every = every or (max(1, math.ceil(total / 20)) if total else 1)
        on = not (disable or disabled_by_env())
        self.plain = on and not interactive(self.file)
        self.t0 = time.perf_counter()
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.file,
                        disable=not on or self.plain, dynamic_ncols=True)

    def update(self, n: int = 1, /, **scalars: float) -> None:
        """Advance n units; `scalars` (losses, lr ...) follow the bar, or go into the line this update prints."""
        before, self.n = self.n, self.n + n
        self.bar.update(n)
        if scalars:
            self.bar.set_postfix(_scalars(scalars), refresh=False)
        if self.plain and (self.n // self.every > before // self.every or self.n == self.total):
            self.line(scalars)

    def line(self, scalars: dict[str, float] | None = None) -> None:
        """Print one plain line: position, scalars, rate, elapsed time and ETA."""
        elapsed = time.perf_counter() - self.t0
        rate = (self.n - self.n0) / elapsed if elapsed > 0 else 0.0  # units/s since the start
        done = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        parts = [f"{self.desc}: {done} {self.unit}s", *(f"{k}={v}" for k, v in _scalars(scalars or {}).items()),
                 f"{rate:.3g} {self.unit}s/s", f"elapsed {tqdm.format_interval(elapsed)}"]
        if self.total is not None and rate > 0 and self.n < self.total:
            parts.append(f"eta {tqdm.format_interval((self.total - self.n) / rate)}")
        print("  ".join(parts), file=self.file, flush=True)
        self.shown = self.n

    def write(self, text: str) -> None:
        """Print a message (above the bar on a terminal)."""
        tqdm.write(text, file=self.file)

    def close(self) -> None:
        """Close the bar; off a terminal, print the last position if no line showed it yet."""
        if self.plain and self.n != self.shown:
            self.line()
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
