"""The one kind of error that is the user's to fix, and how the entry scripts report errors."""
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode

logger = logging.getLogger(__name__)


class UserInputError(Exception):
    """A mistake in what the user gave (an option, a file): its message names the problem and the way out, and
    the entry scripts print it as one line instead of a traceback."""


class ConfigError(UserInputError, ValueError):
    """A configuration value that cannot work, named with the way out."""


class JobFailedError(CompactHydraException):
    """A job of a multirun (one shard of a cluster sweep) failed. Hydra prints this kind in one line, in the process
    that launched the jobs; the job's traceback is in the log file the message names."""


def _full_errors_wanted() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1" or "--debug" in sys.argv


def _multirun_job() -> Optional[HydraConfig]:
    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    return hydra_cfg if hydra_cfg.mode == RunMode.MULTIRUN else None


@contextmanager
def user_errors_in_one_line() -> Iterator[None]:
    """Turn a UserInputError into `error: <message>` and exit status 1; any other exception is a bug of ours and
    keeps its traceback. In a job of a multirun (`-m`, e.g. shards through hydra-submitit-launcher) any failure
    becomes one line naming the job, its overrides and its log file, which holds the error (and the traceback of
    a bug). HYDRA_FULL_ERROR=1 or
    --debug keeps every traceback."""
    try:
        yield
    except Exception as e:
        if _full_errors_wanted():
            raise
        job = _multirun_job()
        if job is not None:
            log = Path(job.runtime.output_dir) / f"{job.job.name}.log"
            what = str(e) if isinstance(e, UserInputError) else f"{type(e).__name__}: {e}"
            logger.error("job %s failed: %s", job.job.num, what, exc_info=not isinstance(e, UserInputError))
            raise JobFailedError(
                f"job {job.job.num} ({' '.join(job.overrides.task)}) failed: {what}; its log: {log}"
            ) from None
        if isinstance(e, UserInputError):
            raise SystemExit(f"error: {e}") from None
        raise
