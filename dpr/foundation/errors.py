"""The one kind of error that is the user's to fix, and how the entry scripts report it."""
import os
import sys
from contextlib import contextmanager
from typing import Iterator


class UserInputError(Exception):
    """A mistake in what the user gave (an option, a file): its message names the problem and the way out, and
    the entry scripts print it as one line instead of a traceback."""


@contextmanager
def user_errors_in_one_line() -> Iterator[None]:
    """Turn a UserInputError into `error: <message>` and exit status 1; HYDRA_FULL_ERROR=1 or --debug keeps the
    traceback. Any other exception is a bug of ours and keeps its traceback."""
    try:
        yield
    except UserInputError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or "--debug" in sys.argv:
            raise
        raise SystemExit(f"error: {e}") from None
