"""Files that appear under their final name only when complete."""
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

TEMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_output(path: Union[str, Path]) -> Iterator[str]:
    """A temporary path beside `path` to write to; when the block ends normally it is synced and renamed to
    `path`, so a crash never leaves a partial file under the final name (nor damages an older one). The file gets
    the permissions of an ordinarily created one (mkstemp's are owner-only)."""
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
    except BaseException:
        if os.path.exists(temp_name):
            os.unlink(temp_name)
        raise
