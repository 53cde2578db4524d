"""Which runtime turns token ids into search vectors (`encoder_backend` of conf/gen_embs.yaml and
conf/dense_retriever.yaml): torch, or ONNX Runtime on the exported graph (`dpr.models.onnx_graph`).

- torch: the encoder itself, on the GPU when there is one, with fp16/bf16 autocast when asked.
- onnx: ONNX Runtime (CPU) on the fp32 graph; vectors within 1e-4 of torch's fp32 ones, so its shards are
  accepted beside torch shards of the same model (the record keeps `encoder_backend` for information).
- onnx_int8: the dynamically quantized graph; faster, but its vectors differ from fp32 ones, so the records
  say `model.quantization: int8` and its shards and question vectors are compared only with int8 ones.

The graph comes from `onnx_dir` (written by `convert_dpr_checkpoint.py export-onnx`, checked to be of the model
being used, its recorded tokenization (prefixes, lengths) checked to be the spec's, by which the texts are
tokenized) or, when that is empty, from a cache folder under `onnx_cache_dir`, exported on first use: one folder
per model weights, vector settings, encoder half and precision, written to a temporary folder and renamed, so shard
jobs running at once each find it whole (when two export it together, the first rename wins and the other's copy is
discarded). Both backends get the same length-sorted batches and write the same shards.
"""
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from dpr.foundation.errors import ConfigError
from dpr.foundation.files import ensure_writable_directory
from dpr.foundation.precision import Precision
from dpr.foundation.provenance import differing_field
from dpr.indexing.encoding import BatchEncoder, TorchVectors
from dpr.indexing.shard_provenance import MODEL_KEYS, model_record
from dpr.models.loading import InferenceEncoder
from dpr.models.onnx_graph import (
    DEFAULT_OPSET, RECORD_NAME, ExportRecord, OnnxExportError, OnnxVectors, export_folder, read_export_record,
    require_onnx,
)

logger = logging.getLogger(__name__)

ENCODER_BACKENDS = ("torch", "onnx", "onnx_int8")
_GRAPH_PRECISION = {"onnx": "fp32", "onnx_int8": "int8"}


@dataclass(frozen=True)
class EncoderBackend:
    name: str = "torch"
    onnx_dir: Optional[str] = None
    onnx_cache_dir: Optional[str] = None

    @classmethod
    def from_config(cls, cfg) -> "EncoderBackend":
        """The backend of a gen_embs or dense_retriever config, checked against its other options."""
        name = cfg.get("encoder_backend") or "torch"
        if name not in ENCODER_BACKENDS:
            raise ConfigError(f"encoder_backend={name}: choose one of {', '.join(ENCODER_BACKENDS)}")
        backend = cls(name, cfg.get("onnx_dir") or None, cfg.get("onnx_cache_dir") or None)
        if name == "torch":
            if backend.onnx_dir:
                raise ConfigError(f"onnx_dir={backend.onnx_dir} is read by encoder_backend=onnx or onnx_int8 only: "
                                  "set one of them, or leave onnx_dir empty")
            return backend
        if cfg.get("fp16") or cfg.get("bf16"):
            raise ConfigError(f"fp16/bf16 are autocast of the torch backend; encoder_backend={name} runs "
                              f"{_GRAPH_PRECISION[name]} graphs: drop fp16/bf16, or use encoder_backend=torch")
        if not backend.onnx_dir:
            if not backend.onnx_cache_dir:
                raise ConfigError(f"encoder_backend={name} needs onnx_dir (a folder of export-onnx) or "
                                  "onnx_cache_dir (where the graph is exported on first use)")
            ensure_writable_directory(Path(backend.onnx_cache_dir).expanduser(), "onnx_cache_dir")
        return backend

    @property
    def quantization(self) -> Optional[str]:
        """What the records say of vectors that differ from fp32 ones (None: torch's fp32 vectors, 1e-4)."""
        return "int8" if self.name == "onnx_int8" else None


def batch_encoder(encoder: InferenceEncoder, backend: EncoderBackend, encoder_type: str, model_file: Optional[str],
                  device: torch.device, precision: Precision) -> BatchEncoder:
    """The runtime of `backend` for `encoder` (the `encoder_type` half of `model_file`); ONNX Runtime gets as many
    intra-op threads as torch has."""
    if backend.name == "torch":
        return TorchVectors(encoder, device, precision)
    require_onnx(f"encoder_backend={backend.name}")
    if device.type != "cpu":
        logger.warning("encoder_backend=%s runs on the CPU (onnxruntime's CPU provider), not on %s", backend.name,
                       device)
    path = graph_path(encoder, backend, encoder_type, model_file)
    logger.info("encoding with ONNX Runtime on %s (%d threads)", path, torch.get_num_threads())
    return OnnxVectors(str(path), torch.get_num_threads())


def graph_path(encoder: InferenceEncoder, backend: EncoderBackend, encoder_type: str,
               model_file: Optional[str]) -> Path:
    precision = _GRAPH_PRECISION[backend.name]
    if backend.onnx_dir:
        folder, option = Path(backend.onnx_dir), "onnx_dir"
        record = read_export_record(str(folder), option)
    else:
        folder, option = cache_folder(encoder, backend, encoder_type), "onnx_cache_dir"
        if (folder / RECORD_NAME).is_file():
            record = read_export_record(str(folder), option)
        else:
            logger.info("exporting the %s encoder to ONNX in %s (first use of this model)", encoder_type, folder)
            record = export_folder({encoder_type: encoder}, str(folder), model_record(encoder, model_file),
                                   quantize="int8" if precision == "int8" else None, keep_existing=True)
    _check_tokenization(record, encoder, folder, option)
    _check_model(record, encoder, folder, option)
    name = record.graph_for(encoder_type, precision)
    if name is None:
        raise OnnxExportError(
            f"{option}={folder} holds no {precision} graph of the {encoder_type} encoder"
            f"{' (export it with --quantize int8)' if precision == 'int8' else ''}")
    return folder / name


def cache_folder(encoder: InferenceEncoder, backend: EncoderBackend, encoder_type: str) -> Path:
    """`{onnx_cache_dir}/{encoder_type}-{precision}-{hash}`: the hash of the model's weights fingerprint, its vector
    settings and the opset, so another model (or another spec of the same weights) never finds this graph."""
    precision = _GRAPH_PRECISION[backend.name]
    key = {"weights": encoder.weights, "vector_params": encoder.spec.vector_params(), "opset": DEFAULT_OPSET,
           "encoder_type": encoder_type, "precision": precision}
    digest = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=10).hexdigest()
    return Path(backend.onnx_cache_dir).expanduser() / f"{encoder_type}-{precision}-{digest}"


def _check_tokenization(record: ExportRecord, encoder: InferenceEncoder, folder: Path, option: str) -> None:
    """Refuse graphs whose folder says their token ids are made otherwise (prefixes, lengths, lower-casing) than the
    model's spec makes them: the graphs would be fed ids of other texts. Folders exported before the record held
    these settings are left to `_check_model` (their encoder_params hold them)."""
    if record.tokenization is None:
        return
    ours = encoder.spec.tokenization_params()
    for key, value in ours.items():
        if key in record.tokenization and record.tokenization[key] != value:
            raise OnnxExportError(
                f"{option}={folder} was exported to tokenize with {key}={record.tokenization[key]!r}, but the "
                f"model's encoder spec (model_file and encoder settings) says {key}={value!r}: give the folder "
                "exported from this checkpoint, or export it again (convert_dpr_checkpoint.py export-onnx)")


def _check_model(record: ExportRecord, encoder: InferenceEncoder, folder: Path, option: str) -> None:
    """Refuse graphs exported from another model (weights fingerprint) or with other vector settings."""
    changed = differing_field({"model": record.model}, {"model": model_record(encoder)}, keys=MODEL_KEYS)
    if changed is not None:
        raise OnnxExportError(
            f"{option}={folder} holds the graphs of another model than the one configured: {changed} (graphs vs "
            "model_file and encoder settings). Export the model again (convert_dpr_checkpoint.py export-onnx) or "
            "leave onnx_dir empty to export it on first use")
