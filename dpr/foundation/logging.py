"""Logging set-up shared by the entry scripts."""
import logging
import sys

_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


def setup_logging(level: int = logging.INFO) -> None:
    """Send package logs to stderr once, whether or not hydra already configured the root logger."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT))
        root.addHandler(handler)
    root.setLevel(level)
