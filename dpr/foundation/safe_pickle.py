"""Reading DPR's pickle files without running code from them.

A pickle names the functions that rebuild its objects, so unpickling a file runs whatever its writer chose. The
files DPR ships as pickles (embedding shards, index id maps, reader samples) hold only plain values, numpy arrays
and a few known classes; this unpickler admits exactly a given set of globals and refuses the rest, naming the
file and what it refused.
"""
import pickle
from pathlib import Path
from typing import BinaryIO, FrozenSet, Tuple, Union

from dpr.foundation.errors import UserInputError

Global = Tuple[str, str]

# What numpy arrays, dtypes and scalars pickle as (numpy 1.x names numpy.core, 2.x numpy._core; protocol 5
# rebuilds arrays with _frombuffer; protocol 2 writes their bytes through _codecs.encode).
NUMPY_GLOBALS: FrozenSet[Global] = frozenset({
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
})


class UnsafePickleError(UserInputError):
    """A pickle that names a global outside what its kind of file may hold."""


class UnreadablePickleError(UserInputError):
    """A pickle that is truncated, empty or not a pickle at all."""


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, allowed: FrozenSet[Global], source: str, kind: str) -> None:
        super().__init__(file)
        self.allowed, self.source, self.kind = allowed, source, kind

    def find_class(self, module: str, name: str):
        if (module, name) not in self.allowed:
            raise UnsafePickleError(
                f"{self.source}: refused to unpickle {module}.{name}, which is not part of a {self.kind} "
                "(loading it could run code from the file)"
            )
        return super().find_class(module, name)


def restricted_load(file: Union[str, Path, BinaryIO], allowed: FrozenSet[Global], kind: str):
    """Unpickle a file (a path or an open binary file) admitting only the `allowed` (module, name) globals; `kind`
    names the kind of file in messages ("DPR embedding shard"). A truncated or non-pickle file raises UnreadablePickleError
    naming the file."""
    if isinstance(file, (str, Path)):
        with open(file, "rb") as handle:
            return restricted_load(handle, allowed, kind)
    source = getattr(file, "name", "<stream>")
    try:
        return _RestrictedUnpickler(file, allowed, str(source), kind).load()
    except UnsafePickleError:
        raise
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError) as e:
        detail = "empty file" if isinstance(e, EOFError) and file.tell() == 0 else f"{type(e).__name__}: {e}"
        raise UnreadablePickleError(f"{source}: truncated or not a {kind} ({detail})") from e
