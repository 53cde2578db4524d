"""What made an embedding shard, recorded beside it, so that stale vectors are never reused or mixed.

`generate_dense_embeddings.py` writes, next to shard `emb_0`, the JSON record `.emb_0.provenance.json` (hidden,
so that an `emb_*` glob, ours or DPR's, never takes it for a shard):

    format, version     "dpr-shard-provenance", 1
    shard_id, num_shards
    encoder_type        which checkpoint half embedded the passages (ctx or question)
    model.checkpoint    the checkpoint's path (absent: the pretrained model of the encoder spec); for information
    model.weights       a fingerprint of the model's weights (`dpr.models.loading.weights_fingerprint`): the whole
                        checkpoint, both towers, or the pretrained encoder
    model.weights_sha256  the sha256 of every weight (records of older versions lack it: compared where both have it)
    model.encoder_params  the encoder spec the vectors follow, in a checkpoint's `encoder_params` form
    model.tokenizer     the tokenizer's identity (`dpr.models.hf_encoder.tokenizer_identity`; compared where both
                        records have it)
    model.quantization  "int8" for vectors of a quantized graph (encoder_backend=onnx_int8); absent otherwise
    encoder_backend     torch, onnx or onnx_int8 (`dpr.indexing.encoder_backend`); for information: torch's and
                        ONNX Runtime's fp32 vectors agree within 1e-4, and int8 is told apart by model.quantization
    passages            path, size, mtime_ns, stat (device, inode, ctime), a hash of 64 blocks spread over the file
                        (the fast check), the sha256 of every byte (recorded by the counting pass; the full check)
                        and the id prefix

Three comparisons use it:
- reuse: a rerun skips a complete shard only when the record it would write equals the saved one in every field
  but `model.checkpoint` (the weights fingerprint and spec already say which model) and `encoder_backend` (torch's
  and ONNX Runtime's fp32 vectors are interchangeable); otherwise it re-embeds and
  says which field changed. A shard without a record is re-embedded.
- mixing: the shards of one `encoded_ctx_files` entry must agree on everything but `shard_id` and where the files
  were (checkpoint path, passages path and mtime, which differ between machines of one sweep) and the backend; an
  int8 shard differs in `model.quantization`, so it is refused beside fp32 ones; the shards of all
  entries must come from one model.
- completeness: an entry holds each shard id once (one shard written in two formats, or by runs of different
  `num_shards`, would be searched twice), every id below its records' `num_shards`, and either every shard or none
  with a record (a record-less shard among recorded ones is left from an interrupted or older run).
- questions: the question encoder must be of the shards' model (same weights fingerprint and vector settings).
- passages: the passages file of `ctx_datatsets[i]` against the records of the shards of `encoded_ctx_files[i]`
  (or a saved index's record of that source): size and sampled blocks before any work, the whole file's sha256 by
  the pass that reads the passages for the results' texts (`dpr.data.ctx_sources.CtxSource.check_sha256`).
Shards without a record (DPR's released ones) are accepted as they are, with an info line, when all of their entry's
shards lack one and no record of their run lies beside them. A record lies beside the file a shard's name leads to:
symbolic links (a shard folder linked from another disk) are resolved.

A re-embed deletes the old shard, then its record, and writes the new record before the new shard: at every moment
a shard is absent or the one its record describes.
"""
import glob
import json
import logging
import os
import re
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from dpr.data.ctx_sources import CtxSource
from dpr.foundation.errors import UserInputError
from dpr.foundation.files import atomic_output
from dpr.foundation.provenance import (
    Difference, content_difference, differing_field, file_identity, full_identity, read_record,
)
from dpr.indexing.faiss_indexers import index_exists
from dpr.models.encoder_spec import VECTOR_FIELDS
from dpr.models.loading import InferenceEncoder

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]
FORMAT = "dpr-shard-provenance"
VERSION = 1

# Where the inputs were: says nothing about the vectors once the weights fingerprint and spec are known.
_STAT_KEYS = ("passages.stat.device", "passages.stat.inode", "passages.stat.ctime_ns")
_LOCATION_KEYS = ("model.checkpoint", "passages.path", "passages.mtime_ns") + _STAT_KEYS
# Everything that must agree for the vectors of two encodings to be comparable.
MODEL_KEYS = ("model.weights", "model.quantization") + tuple(
    "model.encoder_params." + (field if field == "do_lower_case" else f"encoder.{field}") for field in VECTOR_FIELDS
)
# Fields that records of older versions lack, compared where both records hold them: the whole weights' digest,
# the tokenizer's identity (`dpr.models.hf_encoder.tokenizer_identity`).
OPTIONAL_MODEL_KEYS = ("model.weights_sha256", "model.tokenizer")
_OPTIONAL_KEYS = OPTIONAL_MODEL_KEYS + ("passages.sha256",)


class ShardProvenanceError(UserInputError):
    """Shards (or shards and a question encoder) that come from different models or passage files."""


def sidecar_path(shard: PathLike) -> Path:
    """Beside the file the shard's name leads to: symbolic links (a shard, or its folder, linked from another disk)
    are resolved, so that the record follows the file, not its name."""
    shard = Path(os.path.realpath(shard))
    return shard.parent / f".{shard.name}.provenance.json"


def passages_identity(source: CtxSource, sha256: Optional[str] = None) -> dict:
    """The passages file as the record holds it (`file_identity`, with the sha256 of its every byte when known)
    and the id prefix of its source."""
    return {**file_identity(source.path, sha256), "id_prefix": source.id_prefix}


def shard_provenance(
    encoder: InferenceEncoder,
    encoder_type: str,
    model_file: Optional[str],
    source: CtxSource,
    shard_id: int,
    num_shards: int,
    backend: str = "torch",
    quantization: Optional[str] = None,
) -> dict:
    """The record of shard `shard_id` of `num_shards` of `source`, embedded by `encoder` through `backend`."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "shard_id": int(shard_id),
        "num_shards": int(num_shards),
        "encoder_type": encoder_type,
        "model": model_record(encoder, model_file, quantization),
        "passages": passages_identity(source),
        "encoder_backend": backend,
    }


def model_record(encoder: InferenceEncoder, model_file: Optional[str] = None, quantization: Optional[str] = None
                 ) -> dict:
    record = {
        "checkpoint": os.path.abspath(model_file) if model_file else None,
        "weights": encoder.weights,
        "weights_sha256": encoder.weights_sha256,
        "encoder_params": encoder.spec.checkpoint_params(),
        "tokenizer": encoder.tokenizer_identity,
    }
    if quantization:  # absent for fp32 vectors, so records written before the key existed still compare equal
        record["quantization"] = quantization
    return record


def write_provenance(shard: PathLike, record: dict) -> None:
    with atomic_output(sidecar_path(shard)) as temp_name, open(temp_name, "w", encoding="utf-8") as file:
        json.dump(record, file, indent=2, sort_keys=True)


def remove_shard_and_provenance(shard: PathLike) -> None:
    """Before a shard is re-embedded: the shard goes first, so that a kill at any moment leaves it either with its
    record or absent (a record without its shard is never read)."""
    Path(shard).unlink(missing_ok=True)
    sidecar_path(shard).unlink(missing_ok=True)


def read_provenance(shard: PathLike) -> Optional[dict]:
    """The shard's record, or None when it has none; a record that is not one is an error naming it."""
    return read_record(sidecar_path(shard), FORMAT, ShardProvenanceError, "shard provenance record",
                       f"delete it to re-embed {shard}")


def reuse_refusal(shard: PathLike, record: dict, source: CtxSource) -> Optional[str]:
    """Why the complete shard at `shard` cannot be reused for `record` (made before the passages are read: without
    their sha256); None when it can. When the saved record has the passages' sha256, the file must still have it:
    known without reading when it is the very file, untouched since (`unchanged_since`), else read whole (less
    than a minute for Wikipedia's 13 GB, where embedding takes hours)."""
    saved = read_provenance(shard)
    if saved is None:
        return f"it has no provenance record ({sidecar_path(shard).name})"
    changed = differing_field(saved, record, ignore=("model.checkpoint", "encoder_backend") + _STAT_KEYS,
                              first_keys=MODEL_KEYS, when_both=_OPTIONAL_KEYS)
    if changed is None and saved["passages"].get("sha256"):
        now = full_identity(source.path, earlier=saved["passages"])
        if now["sha256"] != saved["passages"]["sha256"]:
            changed = Difference("passages.sha256", saved["passages"]["sha256"], now["sha256"])
    return None if changed is None else f"{changed.field} changed from {changed.first!r} to {changed.second!r}"


_MIXING_IGNORED = ("shard_id", "format", "version", "encoder_backend") + _LOCATION_KEYS


# `{out_file}_{shard_id}` in any of the formats of `dpr.data.embeddings_io.SHARD_SUFFIXES`
_SHARD_NAME = re.compile(r"(?P<stem>.*)_(?P<shard_id>\d+)(\.pkl|\.npz)?")


def _refuse_duplicate_ids(shards: Sequence[Path]) -> None:
    """One file per shard id: the same shard in two formats (or from runs of different shard counts) would be
    searched twice."""
    seen: dict[tuple[Path, str, int], Path] = {}
    for shard in shards:
        target = Path(os.path.realpath(shard))  # a link and its target are one shard
        name = _SHARD_NAME.fullmatch(target.name)
        if name is None:
            continue
        key = (target.parent, name["stem"], int(name["shard_id"]))
        if key in seen:
            raise ShardProvenanceError(
                f"embedding shards {seen[key]} and {shard} are both shard {key[2]} of {key[0] / key[1]}: its passages "
                "would be searched twice. Delete the one of the other run (or format), or name one format's files "
                "in encoded_ctx_files (e.g. emb_*.npz)"
            )
        seen[key] = shard


def _recorded_sibling(shard: Path) -> Optional[Path]:
    """A record of another shard of the same `{out_file}` in the folder of the shard's name or of its target: a
    record-less shard among recorded ones is left from an interrupted or older run, whichever of them are named."""
    name = _SHARD_NAME.fullmatch(Path(os.path.realpath(shard)).name) or _SHARD_NAME.fullmatch(shard.name)
    if name is None:
        return None
    for folder in dict.fromkeys((shard.parent, Path(os.path.realpath(shard)).parent)):
        for record in sorted(folder.glob(f".{glob.escape(name['stem'])}_*.provenance.json")):
            sibling = _SHARD_NAME.fullmatch(record.name[1:-len(".provenance.json")])
            if sibling is not None and sibling["stem"] == name["stem"]:
                return folder / record.name[1:-len(".provenance.json")]
    return None


def _refuse_unrecorded(shard: Path, example: Path) -> None:
    raise ShardProvenanceError(
        f"embedding shard {shard} has no provenance record ({sidecar_path(shard).name}) but {example} has: it is "
        "left from an interrupted or older run. Re-embed it (generate_dense_embeddings.py with its shard_id) or "
        "delete it"
    )


def _refuse_incomplete_set(records: dict[Path, Optional[dict]]) -> None:
    """A set whose shards have records must have all of them, each shard id below `num_shards` present; a
    record-less shard beside records of its `out_file`'s other shards is refused too, named alone or not."""
    recorded = {shard: record for shard, record in records.items() if record is not None}
    unrecorded = [shard for shard, record in records.items() if record is None]
    if unrecorded and recorded:
        _refuse_unrecorded(unrecorded[0], next(iter(recorded)))
    for shard in unrecorded:
        sibling = _recorded_sibling(shard)
        if sibling is not None:
            _refuse_unrecorded(shard, sibling)
    if not recorded:
        return
    example, record = next(iter(recorded.items()))
    num_shards = record["num_shards"]
    missing = sorted(set(range(num_shards)) - {r["shard_id"] for r in recorded.values()})
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise ShardProvenanceError(
            f"the embedding shards of {example.parent} ({example.name} ...) lack shard(s) {shown} of {num_shards}: "
            "the passages they hold would never be found. Embed the missing shard_id(s) with "
            "generate_dense_embeddings.py (a killed job leaves its shard absent)"
        )


def check_shard_sets(shard_sets: Sequence[Sequence[PathLike]]) -> Optional[tuple[Path, dict]]:
    """Refuse shards of different provenance: within a set (one passages source) they must agree on all but the
    shard id and file locations, across sets on the model; and refuse an incomplete set (see the module's
    docstring). Returns a (shard, record) of the shards' model, or None when no shard has a record."""
    reference: Optional[tuple[Path, dict]] = None
    unrecorded: list[Path] = []
    for shards in shard_sets:
        shards = list(map(Path, shards))
        _refuse_duplicate_ids(shards)
        records = {shard: read_provenance(shard) for shard in shards}
        first: Optional[tuple[Path, dict]] = None
        for shard, record in records.items():
            if record is None:
                unrecorded.append(shard)
                continue
            if first is None:
                first = (shard, record)
                if reference is not None:
                    _refuse_difference(reference, first, keys=MODEL_KEYS, what="come from different models",
                                       when_both=OPTIONAL_MODEL_KEYS)
                    continue
                reference = first
            else:
                _refuse_difference(first, (shard, record), ignore=_MIXING_IGNORED, what="were made differently")
        _refuse_incomplete_set(records)
    if unrecorded:
        log = logger.warning if reference is not None else logger.info
        log("%d shard(s) have no provenance record (e.g. DPR's released shards), used as they are: %s%s",
            len(unrecorded), ", ".join(map(str, unrecorded[:3])), " ..." if len(unrecorded) > 3 else "")
    return reference


def _refuse_difference(first: tuple[Path, dict], second: tuple[Path, dict], what: str,
                       keys: Optional[Iterable[str]] = None, ignore: Iterable[str] = (),
                       when_both: Iterable[str] = _OPTIONAL_KEYS) -> None:
    changed = differing_field(first[1], second[1], keys=keys, ignore=ignore, first_keys=MODEL_KEYS,
                              when_both=when_both)
    if changed is not None:
        raise ShardProvenanceError(
            f"embedding shards {first[0]} and {second[0]} {what}: {changed}. Mixing them would search stale "
            "vectors; re-embed the stale shards (generate_dense_embeddings.py re-embeds any shard whose record "
            "differs) or name only shards of one run in encoded_ctx_files"
        )


def check_saved_index(location: PathLike, index_record: Optional[dict], shards_model: Optional[tuple[Path, dict]]) -> None:
    """Refuse a saved index built from another model's vectors than the shards it is loaded beside."""
    if index_record is None or shards_model is None:
        return
    changed = differing_field(index_record, shards_model[1], keys=MODEL_KEYS, when_both=OPTIONAL_MODEL_KEYS)
    if changed is not None:
        raise ShardProvenanceError(
            f"the saved index {location} holds another model's vectors than the shards {shards_model[0]}: "
            f"{changed} (index vs shards). Delete the saved index to build it from these shards"
        )


def check_question_encoder(encoder: InferenceEncoder, shards_model: tuple[Path, dict],
                           quantization: Optional[str] = None) -> None:
    """Refuse to search the shards, or an index saved from shards (its meta file keeps their record), with
    questions encoded by another model or with other vector settings (int8 graphs against fp32 vectors too)."""
    where, record = shards_model
    changed = differing_field(record, {"model": model_record(encoder, quantization=quantization)}, keys=MODEL_KEYS,
                              when_both=OPTIONAL_MODEL_KEYS)
    if changed is None:
        return
    if index_exists(where):
        raise ShardProvenanceError(
            f"the question encoder is not the model whose vectors the saved index {where} holds: {changed} (index "
            "vs questions). Give the model_file the index was built with, or a new index_path (or delete the "
            "saved index) to build it from the new model's shards"
        )
    raise ShardProvenanceError(
        f"the question encoder is not the model that embedded {where}: {changed} (shard vs questions). Give "
        "the model_file and encoder settings the passages were embedded with, or re-embed the passages"
    )


def check_shard_passages(shard_sets: Sequence[Sequence[PathLike]], sources: Sequence[CtxSource],
                         records: Optional[dict] = None) -> None:
    """Refuse to retrieve with a passages file whose content is not the one the paired shards were embedded from
    (`encoded_ctx_files[i]` with `ctx_datatsets[i]`): the results would show other texts than the vectors encode.
    `records`: path -> record, for records kept elsewhere than beside a shard (a saved index's meta file). Shards
    without a record are left to `check_shard_sets`' info line."""
    for shards, source in zip(shard_sets, sources):
        for shard in map(Path, shards):
            record = (records or {}).get(shard) or read_provenance(shard)
            if record is not None and "passages" in record:
                check_passages(record["passages"], source, f"the shard {shard}", "Give the passages file the "
                               "shards were embedded from, or re-embed the passages")


def check_passages(recorded: dict, source: CtxSource, made: str, way_out: str) -> None:
    """`source`'s file against the passages identity a record of what was `made` from it holds: its size and
    sampled blocks now, before any work (`file_identity`'s fast check); and its every byte's sha256, when the record
    has it, by the next pass that reads the whole file anyway (`CtxSource.check_sha256`: the texts of the results
    are read before any result is written)."""
    changed = content_difference(recorded, passages_identity(source))
    if changed is not None:
        raise ShardProvenanceError(
            f"the passages file {source.path} is not the one {made} was made from ({recorded.get('path')}): "
            f"passages.{changed} (then vs now). {way_out}")
    sha256 = recorded.get("sha256")
    if sha256 and all(sha256 != expected for expected, _, _ in source.expected_sha256):
        source.expect_sha256(sha256, made, way_out)


def index_source_records(shard_sets: Sequence[Sequence[PathLike]]) -> list[Optional[dict]]:
    """For a saved index: one record per passage source (the first of its shards'; they agree, `check_shard_sets`
    saw to it), None for a source whose shards have none."""
    return [next((record for record in map(read_provenance, shards) if record is not None), None)
            for shards in shard_sets]


def check_saved_index_passages(location: PathLike, source_records: Optional[list], provenance: Optional[dict],
                               sources: Sequence[CtxSource]) -> None:
    """Each passage source of `ctx_datatsets` against the record a saved index keeps of the source at its position
    (as the shards' records are checked). Indexes saved by older versions keep one record, of their first source:
    checked when they have one source, else a warning says what cannot be checked."""
    way_out = "Give the passages files the index was built from, or delete the saved index to build it again"
    if source_records is None:
        if provenance is not None and len(sources) == 1:
            check_passages(provenance["passages"], sources[0], f"the saved index {location}", way_out)
        elif provenance is not None:
            logger.warning("the saved index %s (of an older version) keeps the record of one passage source only: "
                           "the %d passage sources of ctx_datatsets are not checked against it", location,
                           len(sources))
        return
    if len(source_records) != len(sources):
        raise ShardProvenanceError(
            f"the saved index {location} was built from {len(source_records)} passage source(s), but ctx_datatsets "
            f"names {len(sources)}: they pair up 1:1, in the order of the encoded_ctx_files it was built from. "
            f"{way_out}")
    for position, (record, source) in enumerate(zip(source_records, sources)):
        if record is not None and "passages" in record:
            check_passages(record["passages"], source, f"the saved index {location} (source {position + 1})",
                           way_out)
