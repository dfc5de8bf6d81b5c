"""What the command-line entry points share: bad input is one line on stderr, ``error: ...``, and exit code 2."""
from __future__ import annotations

import argparse
import logging
import sys

MAX_ERROR_CHARS = 400

# transformers imports torchao when it is installed (GPTQModel, a dev dependency, pulls it in); on a CPU machine
# torchao logs at WARNING that its CUDA kernels do not load, on every start. Not the user's concern here.
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)


def setup_logging(verbose: bool = False) -> None:
    """The commands' log format; the HTTP and hub libraries only at WARNING, each of their lines once."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "huggingface_hub", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for library in ("huggingface_hub", "datasets"):  # they print through a handler of their own: once is enough
        logging.getLogger(library).propagate = False


def one_line(message: object, limit: int = MAX_ERROR_CHARS) -> str:
    """The first line of `message`, cut to `limit` characters (library errors can list hundreds of names)."""
    text = str(message).strip()
    first = text.splitlines()[0] if text else ""
    return first if len(first) <= limit else first[:limit - 3] + "..."


def positive_int(text: str) -> int:
    """argparse `type` for counts: a whole number of at least 1 (argparse turns the ValueError into one line)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def print_error(message: object) -> None:
    print(f"error: {one_line(message)}", file=sys.stderr)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse whose errors (unknown flag, bad int, bad choice) are the one ``error: ...`` line, no usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print_error(message)
        raise SystemExit(2)
