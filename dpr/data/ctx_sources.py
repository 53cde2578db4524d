"""Passage sources named in `conf/ctx_sources/` (DPR's CsvCtxSrc), or given directly as a file path.

A named source has a `file` (a resource key such as `data.wikipedia_split.psgs_w100`, a path or a glob) and an
`id_prefix` (`'wiki:'` for DPR's Wikipedia) put before every passage id. A path given directly gets no prefix.
"""
import logging
from dataclasses import dataclass
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


def iter_sources(sources: Sequence[CtxSource]) -> Iterator[Passage]:
    """Every passage of every source in order, ids prefixed by their source's prefix; an id repeated in a source or
    across them is refused once the end is reached."""
    return iter_passage_files([(source.path, source.id_prefix) for source in sources])


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
