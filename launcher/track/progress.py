"""What a person reads while a run trains: tqdm's bar on a terminal, a plain line every
--log_every steps where the output is a file (Slurm, a redirected log: a bar there is a stream of
\\r frames), or nothing (--progress); and the run's other passing lines, which --quiet drops along
with the progress. Warnings, errors and the final lines are printed elsewhere, always."""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


def progress_style(progress: str, quiet: bool, stream=None) -> str:
    """bar, lines or off: --progress, with auto a bar where `stream` (stderr, the bar's) is a terminal."""
    if quiet:
        return "off"
    if progress == "auto":
        stream = stream or sys.stderr
        return "bar" if stream.isatty() else "lines"
    return progress


def duration(seconds: float) -> str:
    """1h02m, 5m12s, 40s."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class Progress:
    """The main process's progress (`shown`; the other ranks show nothing) in one of three styles."""

    def __init__(self, style: str, quiet: bool, total: int, shown: bool):
        self.style = style if shown else "off"
        self.talks = shown and not quiet  # the passing lines (evaluation results, unfreezing, plateaus)
        self.total = total
        self.bar = None
        self.step = self.first_step = 0
        self.started = time.perf_counter()

    def start(self, step: int) -> None:
        """Training begins (or resumes) at optimizer step `step`."""
        self.step = self.first_step = step
        self.started = time.perf_counter()
        if self.style == "bar":
            self.bar = tqdm(total=self.total, initial=step, unit="step", dynamic_ncols=True)

    def advance(self) -> None:
        """One optimizer step done."""
        self.step += 1
        if self.bar is not None:
            self.bar.update(1)

    def logged(self, loss: float, lr: float, samples_per_s: float) -> None:
        """A step that logged its training metrics: the bar's figures, or a line."""
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}", samples_s=f"{samples_per_s:.0f}")
        elif self.style == "lines":
            done = self.step - self.first_step
            rate = done / max(time.perf_counter() - self.started, 1e-9)  # steps/s in this process
            eta = (
                f" eta {duration((self.total - self.step) / rate)}" if done and self.step < self.total else ""
            )
            print(
                f"step {self.step}/{self.total} ({100 * self.step // max(self.total, 1)}%) loss {loss:.4g} "
                f"lr {lr:.3g} {samples_per_s:.0f} samples/s{eta}",
                flush=True,
            )

    def say(self, line: str) -> None:
        """A passing line (not a warning): under the bar, printed, or dropped with --quiet."""
        if self.talks:
            self.warn(line)

    def warn(self, line: str) -> None:
        """A line printed with --quiet too (a warning, an early stop), under the bar if there is one."""
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        """The bar ends here, so that a message after it starts on a line of its own."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
