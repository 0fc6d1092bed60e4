"""Live progress for long steps (conversion, quantization, validation, packing, downloads).

On a terminal: a rich spinner with the elapsed time while a step runs, then one ``✓`` line
with its duration. Not a terminal (CI logs, pipes): plain lines, ``· converting ...`` when a
step starts and ``· convert: 12.34 s`` when it ends (bench/build.py reads those). ``-q``
silences both; errors still print. Everything goes to stderr: stdout keeps the result.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from edgepack.cli.output import verbosity


class StageReporter:
    """A ``log`` callable for the pipelines, with ``stage`` and ``transfer`` for live steps."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True, highlight=False)
        self.level = verbosity()

    def __call__(self, message: str) -> None:
        if self.level >= 0:
            self.console.print(f"· {message}", markup=False, highlight=False)

    @contextmanager
    def stage(self, name: str, text: str) -> Iterator[None]:
        """Show ``text`` while the block runs; report ``name: SECONDS s`` after."""
        t0 = time.perf_counter()
        if self.level < 0:
            yield
            return
        if not self.console.is_terminal:
            self(text)
            yield
            self(f"{name}: {time.perf_counter() - t0:.2f} s")
            return
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                      console=self.console, transient=True) as progress:
            progress.add_task(text, total=None)
            yield
        self.console.print(f"[green]✓[/] {text} [dim]({name}: "
                           f"{time.perf_counter() - t0:.2f} s)[/]", highlight=False)

    @contextmanager
    def transfer(self, text: str, total: int | None) -> Iterator[TransferBar]:
        """A byte-counting bar (bytes, rate, ETA) for a download of ``total`` bytes."""
        bar = TransferBar(self, text, total)
        try:
            yield bar
        finally:
            bar.close()


@contextmanager
def hub_progress_bars(reporter: StageReporter) -> Iterator[None]:
    """huggingface_hub's own download bars (bytes, rate, ETA) only on a terminal and without
    -q: piped, their carriage-return updates would litter logs."""
    try:
        from huggingface_hub.utils import (
            are_progress_bars_disabled,
            disable_progress_bars,
            enable_progress_bars,
        )
    except ImportError:  # a device without the build extras never pulls
        yield
        return
    was_disabled = are_progress_bars_disabled()
    if reporter.level < 0 or not reporter.console.is_terminal:
        disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


class TransferBar:
    """``advance(n)`` after each ``n`` bytes; a terminal shows bytes, rate and ETA."""

    def __init__(self, reporter: StageReporter, text: str, total: int | None) -> None:
        self.reporter, self.text, self.total, self.done = reporter, text, total, 0
        self.t0 = time.perf_counter()
        self._progress: Progress | None = None
        if reporter.level >= 0 and reporter.console.is_terminal:
            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                TransferSpeedColumn(), TimeRemainingColumn(),
                console=reporter.console, transient=True)
            self._progress.start()
            self._task = self._progress.add_task(text, total=total)
        else:
            reporter(text)

    def advance(self, n: int) -> None:
        self.done += n
        if self._progress is not None:
            self._progress.update(self._task, advance=n)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        seconds = time.perf_counter() - self.t0
        rate = self.done / seconds / 2**20 if seconds > 0 else 0.0
        self.reporter(f"{self.text}: {self.done / 2**20:.1f} MiB in {seconds:.1f} s "
                      f"({rate:.1f} MiB/s)")
