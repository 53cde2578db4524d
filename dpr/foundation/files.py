"""Files that appear under their final name only when complete, and the folders they are written to."""
import errno
import glob
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Tuple, Union

from dpr.foundation.errors import UserInputError

TEMP_SUFFIX = ".tmp"


class UnwritableDirectoryError(UserInputError):
    """An output folder that cannot be created or written to."""


class OutputWriteError(UserInputError):
    """An output that could not be written because the disk (or the user's quota) is full."""


_FULL_DISK = (errno.ENOSPC, errno.EDQUOT)
# fsync of a folder refused by the filesystem, not failed: a rename there is as durable as the filesystem makes it
_FOLDER_SYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.ENOSYS}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sync_directory(folder: Union[str, Path]) -> None:
    """fsync `folder`, so that a rename into it survives a power loss, not only a killed process (the file's own
    fsync makes its bytes durable, not its name). Best effort where the platform or filesystem cannot sync a folder
    (no O_DIRECTORY, a folder that cannot be opened, EINVAL/ENOTSUP from fsync); a real I/O error is raised."""
    try:
        descriptor = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError as e:
        if e.errno not in _FOLDER_SYNC_UNSUPPORTED:
            raise
    finally:
        os.close(descriptor)


@contextmanager
def atomic_output(path: Union[str, Path]) -> Iterator[str]:
    """A temporary path beside `path` to write to; when the block ends normally it is synced and renamed to
    `path`, and the folder is synced, so a crash or a power loss never leaves a partial file under the final name
    (nor damages an older one). The file gets
    the permissions of an ordinarily created one (mkstemp's are owner-only). A killed process leaves its
    temporary `.{name}.XXXXXXXX.tmp` behind: `remove_stale_temporaries` clears them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.close(descriptor)
    try:
        yield temp_name
        with open(temp_name, "rb") as written:
            os.fsync(written.fileno())
        os.chmod(temp_name, 0o666 & ~_umask())
        os.replace(temp_name, path)
        sync_directory(path.parent)
    except BaseException as e:
        if os.path.exists(temp_name):
            os.unlink(temp_name)
        if isinstance(e, OSError) and e.errno in _FULL_DISK:
            raise OutputWriteError(_full_disk_message(path)) from e
        raise


@contextmanager
def atomic_output_directory(path: Union[str, Path], keep_existing: bool = False) -> Iterator[str]:
    """A temporary folder beside `path` to fill; when the block ends normally its files are synced and it is
    renamed to `path` (the folder and its parent synced), so a crash never leaves a partial folder under the final name. A previous folder there
    stays whole until the new one is complete, then is moved aside and removed (a kill between those two renames
    leaves neither under the name, only temporaries: the next run builds it again). A full disk is an
    OutputWriteError naming `path`; a killed process leaves its `.{name}.XXXXXXXX.tmp` folder behind, which
    `remove_stale_temporaries` clears. `keep_existing`: a folder that another process completed under `path`
    meanwhile is kept and the new one discarded (a cache that concurrent jobs fill with the same content)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp_dir = tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        yield temp_dir
        for folder, _, names in os.walk(temp_dir):
            for name in names:
                with open(os.path.join(folder, name), "rb") as written:
                    os.fsync(written.fileno())
        os.chmod(temp_dir, 0o777 & ~_umask())
        if keep_existing:
            try:
                os.rename(temp_dir, path)  # fails on a non-empty folder there: another process's, complete
            except OSError:
                if not path.is_dir():
                    raise
                shutil.rmtree(temp_dir)
        elif path.is_dir():
            aside = tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
            os.replace(path, aside)  # onto the empty folder just made: rename(2) replaces an empty folder
            os.replace(temp_dir, path)
            shutil.rmtree(aside)
        else:
            os.replace(temp_dir, path)
        sync_directory(path)
        sync_directory(path.parent)
    except BaseException as e:
        shutil.rmtree(temp_dir, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in _FULL_DISK:
            raise OutputWriteError(_full_disk_message(path)) from e
        raise


def _full_disk_message(path: Path) -> str:
    free = shutil.disk_usage(path.parent).free
    kept = "the previous file under that name is intact" if path.exists() else "nothing was written under that name"
    return (f"could not write {path}: no space left on device ({free / 2**20:.0f} MB free in {path.parent}); "
            f"{kept}. Free some space or write it elsewhere")


def remove_stale_temporaries(folder: Union[str, Path], name_prefix: str) -> Tuple[int, int]:
    """Remove the temporaries `atomic_output` (files) and `atomic_output_directory` (folders) left in `folder` for
    outputs named `{name_prefix}*` when their write was killed; returns (temporaries removed, bytes freed). Only
    for a folder no other process is writing such outputs to."""
    pattern = os.path.join(glob.escape(str(folder)), "." + glob.escape(name_prefix) + "*" + TEMP_SUFFIX)
    count, size = 0, 0
    for path in glob.glob(pattern):
        if os.path.isfile(path):
            size += os.path.getsize(path)
            os.unlink(path)
            count += 1
        elif os.path.isdir(path) and not os.path.islink(path):
            size += sum(os.path.getsize(os.path.join(parent, name)) for parent, _, names in os.walk(path)
                        for name in names)
            shutil.rmtree(path)
            count += 1
    return count, size


def _write_test(folder: Union[str, Path]) -> None:
    """Create `folder` if need be and write (and remove) a file there; OSError where that fails."""
    os.makedirs(folder, exist_ok=True)
    descriptor, probe = tempfile.mkstemp(dir=folder, prefix=".write_test.", suffix=TEMP_SUFFIX)
    os.close(descriptor)
    os.unlink(probe)


def ensure_writable_output(path: Union[str, Path], option: str) -> None:
    """Prove, before any work, that the file `path` (set by `option`) can be written: its folder is created if
    need be and takes a file, and `path` is not a folder. An hour of work never ends at an unwritable output."""
    path = Path(path)
    if path.is_dir():
        raise UnwritableDirectoryError(f"{option}={path} is a folder, not a file: give a file name")
    folder = path.parent if str(path.parent) else Path(".")
    try:
        _write_test(folder)
    except OSError as e:
        raise UnwritableDirectoryError(
            f"{option}={path}: its folder {folder} is not one this process can write to ({e.strerror or e}): "
            f"choose another {option}"
        ) from e


def ensure_writable_directory(path: Union[str, Path], option: str) -> None:
    """Create `path` if need be and prove that a file can be written there, so that a run fails at its start,
    not at its first save; the error names the option that set the folder."""
    try:
        _write_test(path)
    except OSError as e:
        raise UnwritableDirectoryError(
            f"{option}={path} is not a folder this process can write to ({e.strerror or e}): choose another {option}"
        ) from e
