"""One run at a time per output: an exclusive lock (flock) on a file beside the output, naming its holder.

Two runs writing one output (a training's output_dir, an embedding shard, a retrieval's out_file, a recipe's run
folder) delete and overwrite each other's files and mix their results; the second one is refused at its start in
one line naming the holder's pid and host. The kernel releases the lock when its holder dies, however it dies, so
a killed run's lock is taken over by the next one, which finds the dead run's record (`RunLock.earlier`: its pid,
host and the process group it ran, if it noted one). A released lock removes its file.

A filesystem without locks (NFS mounted with `nolock` refuses or fakes them, Lustre without `-o flock` refuses
them) cannot keep two runs apart: it is refused in one line, with `DPR_RUN_LOCK=off` as the way to run without the
check (the user then keeps runs apart). Only an `flock` that the filesystem refuses can be seen: one that NFS
fakes locally (`nolock`) keeps apart the runs of one host only.
"""
import errno
import fcntl
import json
import os
import socket
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

from dpr.foundation.errors import UserInputError

DISABLE_VARIABLE = "DPR_RUN_LOCK"  # "off": no lock is taken (a filesystem without locks, the user's own care)
# flock refused by the filesystem, not held by another run
_LOCKS_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}


class OutputInUseError(UserInputError):
    """Another live run holds the output's lock."""


class LocksUnsupportedError(UserInputError):
    """The output's filesystem refuses file locks."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds (or held, until it died) a run lock."""

    pid: int
    host: str
    program: str  # the script's file name
    process_group: Optional[int] = None  # of the child process it runs, where it noted one (`note_process_group`)

    @property
    def on_this_host(self) -> bool:
        """Its pid and process group mean something here (a lock on a shared disk may come from another node)."""
        return self.host == socket.gethostname()

    def describe(self) -> str:
        return f"{self.program}, pid {self.pid} on {self.host}"

    @classmethod
    def parse(cls, text: str) -> Optional["LockHolder"]:
        try:
            record = json.loads(text)
            return cls(int(record["pid"]), str(record["host"]), str(record["program"]),
                       None if record.get("process_group") is None else int(record["process_group"]))
        except (ValueError, TypeError, KeyError):
            return None  # empty (a holder killed before it wrote), or not ours


FOLDER_LOCK_NAME = ".run.lock"


def lock_file_for(output: Union[str, Path]) -> Path:
    """The lock file of an output: inside a folder (`.run.lock`: its parent may not be writable), beside a file
    (`.{name}.lock`). Hidden, so that a glob of the outputs (`embs/psgs_*`) never matches it."""
    output = Path(output)
    return output / FOLDER_LOCK_NAME if output.is_dir() else output.parent / f".{output.name}.lock"


class RunLock:
    """A held lock; `release()` (or the end of the `run_lock` block, or the process) gives it up."""

    def __init__(self, path: Path, descriptor: int, earlier: Optional[LockHolder]):
        self.path = path
        self.earlier = earlier  # the record of a run that died holding the lock; None when it was free
        self._descriptor: Optional[int] = descriptor
        self.holder = LockHolder(os.getpid(), socket.gethostname(), Path(sys.argv[0] or "python").name)
        self._write(self.holder)

    def note_process_group(self, process_group: int) -> None:
        """Record the process group of the child this run is running, so that a run taking the lock over from this
        one if it is killed can end that group (`process_groups.end_orphan_process_group`)."""
        self.holder = LockHolder(self.holder.pid, self.holder.host, self.holder.program, process_group)
        self._write(self.holder)

    def _write(self, holder: LockHolder) -> None:
        os.ftruncate(self._descriptor, 0)
        os.pwrite(self._descriptor, (json.dumps(asdict(holder)) + "\n").encode(), 0)

    def release(self) -> None:
        """Remove the lock file, then unlock (in that order: a run that opened the file meanwhile finds it gone
        and opens the next one, `acquire_run_lock`)."""
        if self._descriptor is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self._descriptor)
        self._descriptor = None

    def __del__(self):
        try:
            self.release()
        except Exception:  # noqa: BLE001 (at interpreter exit the modules it needs may be gone; the kernel unlocks)
            pass


def acquire_run_lock(output: Union[str, Path], option: str) -> Optional[RunLock]:
    """Take the lock of `output` (a file or folder, set by `option`), or refuse in one line: OutputInUseError while
    another live run holds it, LocksUnsupportedError where the filesystem has no locks. None when DPR_RUN_LOCK=off.
    The output's folder (or the output folder itself) must exist."""
    if os.environ.get(DISABLE_VARIABLE, "").lower() in ("off", "false", "0"):
        return None
    path = lock_file_for(output)
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = LockHolder.parse(os.pread(descriptor, 4096, 0).decode(errors="replace"))
            os.close(descriptor)
            raise OutputInUseError(
                f"{option}={output} is in use by another run ({holder.describe() if holder else 'pid unknown'}): "
                f"wait for it to end, stop it, or choose another {option}") from None
        except OSError as e:
            os.close(descriptor)
            if e.errno not in _LOCKS_UNSUPPORTED:
                raise
            raise LocksUnsupportedError(
                f"{option}={output} is on a filesystem without file locks (flock: {e.strerror}), so two runs into "
                f"it could not be kept apart: choose another {option} (a local disk, or a mount with locks, e.g. "
                f"Lustre's -o flock), or set {DISABLE_VARIABLE}=off and run one at a time yourself") from e
        try:  # the file may have been released (removed) between the open and the flock: lock the one there now
            same = os.path.samestat(os.fstat(descriptor), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            earlier = LockHolder.parse(os.pread(descriptor, 4096, 0).decode(errors="replace"))
            return RunLock(path, descriptor, earlier)
        os.close(descriptor)


@contextmanager
def run_lock(output: Union[str, Path], option: str) -> Iterator[Optional[RunLock]]:
    """`acquire_run_lock` for the block."""
    lock = acquire_run_lock(output, option)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
