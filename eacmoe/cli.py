"""What the command-line entry points share: bad input is one line on stderr, ``error: ...``, and exit code 2."""
from __future__ import annotations

import argparse
import sys

MAX_ERROR_CHARS = 400


def one_line(message: object, limit: int = MAX_ERROR_CHARS) -> str:
    """The first line of `message`, cut to `limit` characters (library errors can list hundreds of names)."""
    text = str(message).strip()
    first = text.splitlines()[0] if text else ""
    return first if len(first) <= limit else first[:limit - 3] + "..."


def print_error(message: object) -> None:
    print(f"error: {one_line(message)}", file=sys.stderr)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse whose errors (unknown flag, bad int, bad choice) are the one ``error: ...`` line, no usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print_error(message)
        raise SystemExit(2)
