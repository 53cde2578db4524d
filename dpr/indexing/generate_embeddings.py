"""Passage embeddings for one shard of a passage collection (`generate_dense_embeddings.py`).

- Only the shard's rows are read, streamed from the TSV (ceil split: every passage lands in exactly one shard).
- DataLoader worker processes read and tokenize: worker w takes chunks w, w+W, ... of `tokenize_chunk` passages.
  Inside a chunk the passages are sorted by token length (longest first) and batched with dynamic padding, so a
  batch carries little padding; every batch remembers the rows it holds and vectors are put back in file order.
  Padding is masked out of attention, so the vectors equal those of fixed padding.
- Vectors are the encoder spec's (`dpr.indexing.encoding`): pooled as it says, L2-normalised for cosine
  similarity. The forward runs without gradients, under fp16/bf16 autocast when asked; vectors are saved as float32.
- The shard is written atomically to `{out_file}_{shard_id}` (DPR pickle), `..._{shard_id}.pkl` (GC-DPR) or
  `..._{shard_id}.npz` (no pickle), with a provenance record beside it (`dpr.indexing.shard_provenance`). A rerun
  skips a complete shard only when its record matches exactly (same model weights and spec, passages file, shard
  and shard count; the passages' sha256, recorded by the counting pass, without reading the file again when it is
  the very file untouched since); otherwise it re-embeds the shard and says why.
- A kill never leaves a searchable stale shard: the old shard and then its record are deleted before encoding, and
  the new record is written before the new shard. `out_file` is checked to be writable before any passage is read;
  the temporaries of a killed run of the same shard are removed.
"""
import hashlib
import itertools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dpr.data.ctx_sources import CtxSource, resolve_ctx_source
from dpr.data.embeddings_io import is_shard_complete, shard_path, write_embeddings
from dpr.data.passages import Passage, count_passages, iter_passage_shard, shard_range
from dpr.data.tensorizer import Tensorizer
from dpr.foundation.errors import ConfigError
from dpr.foundation.files import ensure_writable_output, remove_stale_temporaries
from dpr.foundation.run_lock import run_lock
from dpr.indexing.encoder_backend import EncoderBackend, batch_encoder
from dpr.indexing.encoding import EncoderSettings, encode_batches, padded_batches
from dpr.indexing.shard_provenance import (
    remove_shard_and_provenance,
    reuse_refusal,
    shard_provenance,
    sidecar_path,
    write_provenance,
)

logger = logging.getLogger(__name__)


class PassageBatch(NamedTuple):
    rows: torch.Tensor  # positions of the batch's passages inside the shard
    ids: list[str]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def _chunks(items: Iterator[Passage], size: int) -> Iterator[list[Passage]]:
    while chunk := list(itertools.islice(items, size)):
        yield chunk


@dataclass
class ShardPlan:
    """Which rows of which file one shard covers."""

    source: CtxSource
    shard_id: int
    num_shards: int
    total: int  # passages in the whole file

    @property
    def size(self) -> int:
        start, end = shard_range(self.total, self.shard_id, self.num_shards)
        return end - start


class TokenizedShard(IterableDataset):
    """Batches of one shard's passages, tokenized in whichever (worker) process iterates it."""

    def __init__(
        self, plan: ShardPlan, tensorizer: Tensorizer, batch_size: int, chunk_size: int, sort_by_length: bool
    ) -> None:
        self.plan = plan
        self.tensorizer = tensorizer
        self.batch_size = batch_size
        # whole batches per chunk, so only a worker's last chunk can end in a short batch
        self.chunk_size = max(1, -(-chunk_size // batch_size)) * batch_size
        self.sort_by_length = sort_by_length

    def __iter__(self) -> Iterator[PassageBatch]:
        worker = get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        plan = self.plan
        passages = iter_passage_shard(
            plan.source.path, plan.shard_id, plan.num_shards, plan.source.id_prefix, plan.total
        )
        for chunk_index, chunk in enumerate(_chunks(passages, self.chunk_size)):
            if chunk_index % workers == worker_id:
                yield from self._batches(chunk_index * self.chunk_size, chunk)

    def _batches(self, first_row: int, chunk: Sequence[Passage]) -> Iterator[PassageBatch]:
        token_ids = self.tensorizer.token_ids([p.text for p in chunk], [p.title for p in chunk])
        for batch in padded_batches(self.tensorizer, token_ids, self.batch_size, self.sort_by_length, first_row):
            ids = [chunk[row - first_row].id for row in batch.rows.tolist()]
            yield PassageBatch(batch.rows, ids, batch.input_ids, batch.attention_mask)


def _recording_ids(batches: Iterator[PassageBatch], ids: list) -> Iterator[PassageBatch]:
    """The batches, unchanged, while each passage's id is put at its row."""
    for batch in batches:
        for row, doc_id in zip(batch.rows.tolist(), batch.ids):
            ids[row] = doc_id
        yield batch


@dataclass(frozen=True)
class EmbeddingSettings:
    """The options of `conf/gen_embs.yaml`, resolved once."""

    encoder: EncoderSettings
    encoder_type: str  # the checkpoint's half that embeds: ctx | question
    source: CtxSource
    out_path: Path  # this shard's file: out_file with shard_id and out_format's extension
    shard_id: int
    num_shards: int
    num_workers: int
    tokenize_chunk: int
    sort_by_length: bool
    backend: EncoderBackend  # torch, or ONNX Runtime on the exported graph

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "EmbeddingSettings":
        """The settings; the shard's file is proved writable before anything else is resolved or read."""
        if not cfg.out_file:
            raise ConfigError("out_file is required: shards are written to {out_file}_{shard_id}")
        if cfg.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {cfg.batch_size}")
        backend = EncoderBackend.from_config(cfg)
        # a linked shard (or folder) is written where the link leads, its record beside it (`sidecar_path`)
        out_path = Path(os.path.realpath(shard_path(cfg.out_file, cfg.shard_id, cfg.out_format)))
        ensure_writable_output(out_path, "out_file")
        return cls(EncoderSettings.from_config(cfg), cfg.encoder_type, resolve_ctx_source(cfg.ctx_src, cfg),
                   out_path, cfg.shard_id, cfg.num_shards, cfg.num_workers, cfg.tokenize_chunk,
                   bool(cfg.sort_by_length), backend)


def generate_dense_embeddings(cfg: DictConfig) -> Path:
    """Embed shard `shard_id` of `num_shards` of `ctx_src`; returns the shard file's path."""
    settings = EmbeddingSettings.from_config(cfg)
    with run_lock(settings.out_path, "out_file"):  # one job per shard file: two would remove each other's temporaries
        return _embed_shard(settings)


def _embed_shard(settings: EmbeddingSettings) -> Path:
    out_path = settings.out_path
    # "emb_1." and ".emb_1.provenance.json": this shard's temporaries only, not those of shard 10's job
    remove_stale_temporaries(out_path.parent, out_path.name + ".")
    remove_stale_temporaries(out_path.parent, sidecar_path(out_path).name + ".")
    source, shard_id, num_shards, backend = settings.source, settings.shard_id, settings.num_shards, settings.backend
    device = settings.encoder.device()
    precision = settings.encoder.precision(device)
    encoder = settings.encoder.load(settings.encoder_type)
    provenance = shard_provenance(encoder, settings.encoder_type, settings.encoder.model_file, source, shard_id,
                                  num_shards, backend.name, backend.quantization)
    if is_shard_complete(out_path):
        refusal = reuse_refusal(out_path, provenance, source)
        if refusal is None:
            logger.info("%s is complete and made from the same model and passages: skipping shard %d",
                        out_path, shard_id)
            return out_path
        logger.warning("re-embedding %s: %s", out_path, refusal)
    remove_shard_and_provenance(out_path)

    # the counting pass reads the whole file anyway: the record gets the sha256 of its every byte
    digest = hashlib.sha256()
    plan = ShardPlan(source, shard_id, num_shards, count_passages(source.path, digest))
    provenance["passages"]["sha256"] = "sha256:" + digest.hexdigest()
    vectors_of = batch_encoder(encoder, backend, settings.encoder_type, settings.encoder.model_file, device, precision)
    tensorizer = Tensorizer.for_biencoder(encoder.spec, encoder.tokenizer)
    batch_size = settings.encoder.batch_size
    dataset = TokenizedShard(plan, tensorizer, batch_size, settings.tokenize_chunk, settings.sort_by_length)
    loader = DataLoader(
        dataset,
        batch_size=None,  # the dataset yields whole batches
        num_workers=settings.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    logger.info(
        "embedding %d passages (shard %d of %d) of %s, backend %s on %s, %s, batch size %d, %d tokenizer "
        "worker(s); pooling %s, similarity %s",
        plan.size, shard_id, num_shards, source.path, backend.name, device, precision.name, batch_size,
        settings.num_workers, encoder.spec.pooling, encoder.spec.similarity,
    )
    ids: list = [None] * plan.size
    vectors = encode_batches(vectors_of, _recording_ids(iter(loader), ids), plan.size, f"shard {shard_id}")
    write_provenance(out_path, provenance)
    write_embeddings(out_path, ids, vectors)
    return out_path
