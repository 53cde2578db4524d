"""Texts to search vectors: the one encoding loop that passages (`generate_dense_embeddings.py`) and questions
(`dense_retriever.py`) go through, so both honour the same encoder spec (pooling; L2-normalised vectors for
cosine similarity, see `dpr.models.biencoder.search_vectors`).

A batch carries `rows`, the positions of its texts in the output, so batches may come in any order (length-sorted,
from several DataLoader workers) and the vectors still come out in text order. Padding is masked out of attention
and of mean pooling, so batching and padding never change a vector.
"""
import ctypes
import functools
import logging
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, NamedTuple, Optional, Protocol, Sequence

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from dpr.data.embeddings_io import refuse_non_finite
from dpr.data.tensorizer import Tensorizer
from dpr.foundation.devices import process_device
from dpr.foundation.precision import Precision, make_precision
from dpr.models.encoder_spec import EncoderSpec
from dpr.models.hf_encoder import encoder_out_size
from dpr.models.loading import InferenceEncoder, load_inference_encoder

logger = logging.getLogger(__name__)


class TextBatch(NamedTuple):
    rows: torch.Tensor  # positions of the batch's texts in the output
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


@dataclass(frozen=True)
class EncoderSettings:
    """Which encoder embeds texts and how it runs (the keys embedding and retrieval share), resolved once."""

    spec: EncoderSpec  # cfg.encoder with do_lower_case; a checkpoint's saved settings go over it when loaded
    model_file: Optional[str]  # a bi-encoder checkpoint; None: the pretrained model of spec.pretrained_model_cfg
    trust_checkpoint: bool
    batch_size: int
    no_cuda: bool
    local_rank: Optional[int]
    fp16: bool
    bf16: bool

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "EncoderSettings":
        return cls(
            spec=EncoderSpec.from_config(cfg.encoder, cfg.do_lower_case),
            model_file=cfg.model_file or None,
            trust_checkpoint=bool(cfg.get("trust_checkpoint", False)),
            batch_size=cfg.batch_size,
            no_cuda=bool(cfg.no_cuda),
            local_rank=cfg.get("local_rank"),
            fp16=bool(cfg.fp16),
            bf16=bool(cfg.bf16),
        )

    def device(self) -> torch.device:
        return process_device(self.no_cuda, self.local_rank)

    def precision(self, device: torch.device) -> Precision:
        return make_precision(device, self.fp16, self.bf16)

    def load(self, encoder_type: str) -> InferenceEncoder:
        """The encoder of `model_file`'s `encoder_type` half (or the pretrained model of the spec), with the
        checkpoint's saved settings applied over the configured spec."""
        return load_inference_encoder(self.spec, encoder_type, self.model_file, self.trust_checkpoint)


def padded_batches(
    tensorizer: Tensorizer, token_ids: Sequence[Sequence[int]], batch_size: int, sort_by_length: bool,
    first_row: int = 0,
) -> Iterator[TextBatch]:
    """Batches of `batch_size` token id lists, padded; longest first when `sort_by_length` (less padding, and a
    batch too large for the GPU fails at once, not at the end). Row i of `token_ids` is output row first_row + i."""
    order = range(len(token_ids))
    if sort_by_length:
        order = sorted(order, key=lambda i: -len(token_ids[i]))
    for start in range(0, len(order), batch_size):
        members = order[start : start + batch_size]
        input_ids, attention_mask = tensorizer.pad([token_ids[i] for i in members])
        yield TextBatch(torch.tensor([first_row + i for i in members], dtype=torch.long), input_ids, attention_mask)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_KEEP_BELOW_BYTES = 1 << 30


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc keep freed blocks below 1 GiB for reuse instead of returning them to the system.

    By default a block over 128 KiB to 32 MiB is mapped afresh at every allocation and unmapped when freed, so
    every activation of every forward (tens of MiB each) starts on untouched pages: a page fault per 4 KiB, about
    1.2 million per 400 passages of MiniLM, 7-25% of the encoding time on CPU. With the blocks kept, a batch
    reuses the previous batch's pages. The process then holds its high-water mark of activations until it ends.
    Once per process; False where the C library has no mallopt (not glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    kept = mallopt(_M_MMAP_THRESHOLD, _KEEP_BELOW_BYTES) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    logger.debug("glibc keeps freed blocks below 1 GiB: %s", kept)
    return kept


class BatchEncoder(Protocol):
    """The seam between the batching loop and a backend: token ids and mask of one batch in, float32 search
    vectors [rows, dim] out (`TorchVectors`; `dpr.indexing.encoder_backend` adds ONNX Runtime's)."""

    dim: int

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> np.ndarray: ...


class TorchVectors:
    """The torch backend: the encoder moved to `device`, run without gradients under `precision`'s autocast."""

    def __init__(self, encoder: InferenceEncoder, device: torch.device, precision: Precision) -> None:
        self.encoder, self.device, self.precision = encoder, device, precision
        encoder.model.to(device)
        self.dim = encoder_out_size(encoder.model)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> np.ndarray:
        with torch.inference_mode(), self.precision.autocast():
            encoded = self.encoder.search_vectors(
                input_ids.to(self.device, non_blocking=True), attention_mask.to(self.device, non_blocking=True)
            )
        return encoded.float().cpu().numpy()


def encode_batches(
    vectors_of: BatchEncoder, batches: Iterable[TextBatch], n: int, description: str = "encoding"
) -> np.ndarray:
    """float32 [n, D] search vectors in row order, whatever order the batches come in; every row must come."""
    keep_freed_memory()
    vectors = np.empty((n, vectors_of.dim), dtype=np.float32)
    filled = np.zeros(n, dtype=bool)
    with tqdm(total=n, desc=description, unit="texts", smoothing=0.1, disable=n == 0) as progress:
        for batch in batches:
            rows = batch.rows.numpy()
            vectors[rows] = vectors_of(batch.input_ids, batch.attention_mask)
            filled[rows] = True
            progress.update(len(rows))
    if not filled.all():
        raise RuntimeError(f"{int((~filled).sum())} of {n} texts were never encoded")
    return vectors


def encode_questions(
    encoder: InferenceEncoder, vectors_of: BatchEncoder, questions: Sequence[str], batch_size: int
) -> np.ndarray:
    """float32 [len(questions), D] search vectors of `[CLS] query_prefix question [SEP]`, truncated at the spec's
    question length, encoded by `vectors_of`."""
    tensorizer = Tensorizer.for_biencoder(encoder.spec, encoder.tokenizer).questions
    started = time.perf_counter()
    batches = padded_batches(tensorizer, tensorizer.token_ids(list(questions)), batch_size, sort_by_length=True)
    vectors = encode_batches(vectors_of, batches, len(questions), "questions")
    refuse_non_finite(vectors, "the question vectors", way_out="encode them in fp32 or bf16 (fp16 overflow makes "
                      "such vectors), or check the model_file's weights")
    logger.info("encoded %d questions in %.1f s", len(questions), time.perf_counter() - started)
    return vectors
