"""Progress lines of the build (which piece, how many, how long) go to stderr, flushed at once."""
import sys


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
