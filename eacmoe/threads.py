"""The torch CPU thread count of a measurement: set from a `--threads` flag and recorded with the figures.

Results, not only speeds, depend on it: a matmul split over more threads sums in another order, and through GPTQ's
rounding and the routers' top-k those last-bit differences grow into perplexity differences larger than the ones
being compared (the default quantization run moved by about 0.6 between one and two threads). So every script that
produces a figure sets the count here, writes it next to the figure, and names it in the command that reproduces it.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence

from .cli import positive_int

DEFAULT_THREADS = 1


def add_threads_argument(parser: argparse.ArgumentParser, default: int | None = DEFAULT_THREADS) -> None:
    """`--threads N` (default 1: the figures in README.md and docs/ are measured with one thread; None: torch's own
    choice, for commands whose users want speed, which then record the count they used)."""
    # "%(default).0s" prints nothing but keeps ArgumentDefaultsHelpFormatter from appending "(default: None)"
    shown = "torch's own choice%(default).0s" if default is None else "%(default)s"
    parser.add_argument("--threads", type=positive_int, default=default,
                        help="torch CPU threads; results depend on it, not only speed, so the count used is recorded "
                             f"(default: {shown})")


def set_threads(threads: int) -> int:
    """Use `threads` torch CPU threads in this process and in the processes it starts; returns the count to record.

    OMP_NUM_THREADS is what torch reads when it is imported, here later or in a child process; a torch already
    imported is set directly. torch itself is not imported here: a parent that only measures its children (peak
    memory) must stay small.
    """
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch = sys.modules.get("torch")
    if torch is None:
        return threads
    torch.set_num_threads(threads)
    return torch.get_num_threads()


def with_threads(argv: Sequence[str], threads: int) -> list[str]:
    """`argv` with `--threads N` stated, so that a recorded command reproduces the figure whatever the default."""
    argv = list(argv)
    if any(a == "--threads" or a.startswith("--threads=") for a in argv):
        return argv
    return argv + ["--threads", str(threads)]


def command_line(program: str, argv: Sequence[str], threads: int) -> str:
    """The shell command `program argv...` with its thread count, as printed next to a figure."""
    return shlex.join([*shlex.split(program), *with_threads(argv, threads)])
