"""Passage sources named in `conf/ctx_sources/` (DPR's CsvCtxSrc), or given directly as a file path.

A named source has a `file` (a resource key such as `data.wikipedia_split.psgs_w100`, a path or a glob) and an
`id_prefix` (`'wiki:'` for DPR's Wikipedia) put before every passage id. A path given directly gets no prefix.
"""
import logging
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence

from omegaconf import DictConfig

from dpr.data.passages import Passage, iter_passages
from dpr.data.resources import resolve_data_path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CtxSource:
    path: str
    id_prefix: str = ""


def resolve_ctx_source(name_or_path: str, cfg: DictConfig) -> CtxSource:
    """The passages file and id prefix of a `cfg.ctx_sources` name, or of a path (no prefix)."""
    if not name_or_path:
        raise ValueError("no passage source given: set ctx_src (generation) or ctx_datatsets (retrieval)")
    entry = (cfg.get("ctx_sources") or {}).get(name_or_path)
    target, id_prefix = (entry.file, entry.get("id_prefix") or "") if entry is not None else (name_or_path, "")
    paths = resolve_data_path(str(target), cfg.get("data_dir"))
    if len(paths) != 1:
        raise ValueError(f"passage source {name_or_path!r} must be one file, but {target!r} names {len(paths)}")
    return CtxSource(paths[0], id_prefix)


def resolve_ctx_sources(names_or_paths: Optional[Iterable[str]], cfg: DictConfig) -> list[CtxSource]:
    names = [names_or_paths] if isinstance(names_or_paths, str) else list(names_or_paths or [])
    return [resolve_ctx_source(name, cfg) for name in names]


def iter_sources(sources: Sequence[CtxSource]) -> Iterator[Passage]:
    """Every passage of every source in order, ids prefixed by their source's prefix."""
    for source in sources:
        yield from iter_passages(source.path, source.id_prefix)


def load_passage_subset(sources: Sequence[CtxSource], wanted_ids: Iterable[object]) -> dict[str, tuple[str, str]]:
    """`id -> (text, title)` for the wanted passages only, streamed from the sources (not the whole collection).

    Raises KeyError naming an id no source holds (a wrong `id_prefix` is the usual cause).
    """
    wanted = {str(doc_id) for doc_id in wanted_ids}
    passages = {p.id: (p.text, p.title) for p in iter_sources(sources) if p.id in wanted}
    missing = wanted.difference(passages)
    if missing:
        example = next(iter(missing))
        raise KeyError(
            f"{len(missing)} retrieved passage id(s), e.g. {example!r}, are not in the passage sources "
            f"{[s.path for s in sources]} (with id prefixes {[s.id_prefix for s in sources]})"
        )
    logger.info("loaded the texts of %d retrieved passages", len(passages))
    return passages
