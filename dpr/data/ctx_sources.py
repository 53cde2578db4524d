"""Passage sources named in `conf/ctx_sources/` (DPR's CsvCtxSrc), or given directly as a file path.

A named source has a `file` (a resource key such as `data.wikipedia_split.psgs_w100`, a path or a glob) and an
`id_prefix` (`'wiki:'` for DPR's Wikipedia) put before every passage id. A path given directly gets no prefix.
"""
import logging
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Sequence

from omegaconf import DictConfig

from dpr.data.data_files import DataFileError
from dpr.data.passages import Passage, iter_passage_files
from dpr.data.resources import DataPathError, resolve_dataset

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CtxSource:
    path: str
    id_prefix: str = ""
    # (sha256, what recorded it, the way out) of what the file held when the records of derived files (embedding
    # shards, saved indexes) were made: checked by every pass that reads the whole file anyway (`iter_sources`)
    expected_sha256: list = field(default_factory=list, compare=False, hash=False, repr=False)

    def expect_sha256(self, sha256: str, recorded_by: str, way_out: str) -> None:
        self.expected_sha256.append((sha256, recorded_by, way_out))

    def check_sha256(self, sha256: str) -> None:
        """Refuse the file when its whole content is not what a record says it was."""
        for expected, recorded_by, way_out in self.expected_sha256:
            if expected != sha256:
                raise PassagesChangedError(
                    f"the passages file {self.path} is not the one {recorded_by} was made from: its sha256 is "
                    f"{sha256}, {expected} then (its size and sampled blocks agree: an edit of the same size, such as "
                    f"a corrected typo, a case change or two rows swapped). {way_out}")


class PassagesChangedError(DataFileError):
    """A passages file whose whole content differs from what a derived file's record says it was made from."""


def resolve_ctx_source(name_or_path: str, cfg: DictConfig) -> CtxSource:
    """The passages file and id prefix of a `cfg.ctx_sources` name, or of a path (no prefix)."""
    if not name_or_path:
        raise DataPathError("no passage source given: set ctx_src (generation) or ctx_datatsets (retrieval)")
    source = resolve_dataset(name_or_path, cfg.get("ctx_sources"), cfg.get("data_dir"))
    if len(source.files) != 1:
        raise DataPathError(f"passage source {name_or_path!r} must be one file, but it names {len(source.files)}: "
                            f"{source.files[:3]}")
    return CtxSource(source.files[0], source.options.get("id_prefix") or "")


def resolve_ctx_sources(names_or_paths: Optional[Iterable[str]], cfg: DictConfig) -> list[CtxSource]:
    names = [names_or_paths] if isinstance(names_or_paths, str) else list(names_or_paths or [])
    return [resolve_ctx_source(name, cfg) for name in names]


def strip_source_prefix(passage_id: str, sources: Sequence[CtxSource]) -> str:
    """A retrieved id as its passages file writes it: without its source's `id_prefix`."""
    for source in sources:
        if source.id_prefix and passage_id.startswith(source.id_prefix):
            return passage_id[len(source.id_prefix):]
    return passage_id


def iter_sources(sources: Sequence[CtxSource], digests: Optional[list] = None) -> Iterator[Passage]:
    """Every passage of every source in order, ids prefixed by their source's prefix; an id repeated in a source or
    across them is refused once the end is reached. Each file read to its end is checked against the sha256 its
    records expect (`CtxSource.expect_sha256`), from the bytes this pass reads; `digests`, when given, gets each
    file's sha256 at its position."""
    def file_read(position: int, sha256: str) -> None:
        sources[position].check_sha256(sha256)
        if digests is not None:
            digests[position:position + 1] = [sha256]

    return iter_passage_files([(source.path, source.id_prefix) for source in sources], file_read)


def load_passage_subset(sources: Sequence[CtxSource], wanted_ids: Iterable[object]) -> dict[str, tuple[str, str]]:
    """`id -> (text, title)` for the wanted passages only, streamed from the sources (not the whole collection).

    Raises DataFileError naming an id no source holds (a wrong `id_prefix` is the usual cause), or one that two
    passages share.
    """
    wanted = {str(doc_id) for doc_id in wanted_ids}
    passages = {p.id: (p.text, p.title) for p in iter_sources(sources) if p.id in wanted}
    missing = wanted.difference(passages)
    if missing:
        example = next(iter(missing))
        raise DataFileError(
            f"{len(missing)} retrieved passage id(s), e.g. {example!r}, are not in the passage sources "
            f"{[s.path for s in sources]} (with id prefixes {[s.id_prefix for s in sources]})"
        )
    logger.info("loaded the texts of %d retrieved passages", len(passages))
    return passages
