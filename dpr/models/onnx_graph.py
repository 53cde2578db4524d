"""An encoder as an ONNX graph whose output is the retrieval vector, and ONNX Runtime running it.

The graph takes `input_ids` and `attention_mask` (int64, [batch, sequence], both axes dynamic) and returns
`vectors` (float32, [batch, D]): the encoder's forward, pooled as the spec says ([CLS] or the masked mean), projected
by `encode_proj` when there is one, L2-normalised for cosine similarity. It is exported from the very module that
`InferenceEncoder.search_vectors` runs (with [CLS] pooling, its last layer computing the [CLS] position only), so
ONNX Runtime gives torch's fp32 vectors up to float rounding (1e-4 is checked on a probe batch at every export).
`quantize_int8` writes a dynamically quantized copy (int8 weights of the matrix products, activations quantized per
batch): smaller and faster on CPU, with vectors that differ from fp32 ones (see docs/retrieval.md for the accuracy
cost), so its vectors are never mixed with fp32 ones.

A folder of exported graphs (`convert_dpr_checkpoint.py export-onnx`, or an entry of the embedding cache) holds the
graph files, the tokenizer and `onnx_export.json`:

    format, version     "dpr-onnx-export", 1
    model               the encoders' record: checkpoint path (information), `weights` (the fingerprint of
                        `dpr.models.loading.weights_fingerprint`) and `encoder_params` (the spec, checkpoint form)
    opset, torch, onnxruntime   how it was exported
    inputs, output      the graph's input names and output name
    files               {file name: {"encoder_types": [question and/or ctx], "precision": fp32 | int8}}
    tokenization        how texts become the graphs' token ids (`EncoderSpec.tokenization_params`): query_prefix
                        and passage_prefix (before a passage's title when it has one), query_sequence_length and
                        sequence_length (where questions and passages are cut), do_lower_case; absent in folders
                        exported before it was written (their model.encoder_params hold the same settings)
"""
import contextlib
import importlib
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from dpr.foundation.errors import UserInputError
from dpr.foundation.files import atomic_output_directory
from dpr.models.loading import InferenceEncoder

logger = logging.getLogger(__name__)

RECORD_NAME = "onnx_export.json"
FORMAT = "dpr-onnx-export"
VERSION = 1
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "vectors"
# the opset tested (torch 2.13's dynamo exporter, ONNX Runtime 1.32 and its quantizer)
DEFAULT_OPSET = 18
# transformers model types whose encoders export (checked in tests/test_export_onnx.py): BERT's layers
EXPORTABLE_MODEL_TYPES = ("bert",)
# the largest difference from torch's fp32 vectors an exported graph may show on the probe batch
FP32_TOLERANCE = 1e-4
_ONNX_MODULES = ("onnx", "onnxscript", "onnxruntime")


class OnnxExportError(UserInputError):
    """An encoder that cannot be exported, or exported graphs that do not belong to the model being used."""


class MissingOnnxExtraError(UserInputError):
    """The onnx extra (onnx, onnxscript, onnxruntime) is not installed."""


def require_onnx(feature: str) -> None:
    """Import the onnx extra's modules, or one line naming the extra: `feature` says what needed it."""
    for name in _ONNX_MODULES:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise MissingOnnxExtraError(
                f"{feature} needs the onnx extra ({name} is not installed): pip install -e '.[onnx]'") from e


def graph_file_name(encoder_types: Sequence[str], precision: str) -> str:
    """question_encoder.onnx, ctx_encoder.onnx, or encoder.onnx for one encoder both towers share; `.int8` before
    the extension for the quantized graph."""
    stem = f"{encoder_types[0]}_encoder" if len(encoder_types) == 1 else "encoder"
    return f"{stem}{'.int8' if precision == 'int8' else ''}.onnx"


class SearchVectorGraph(nn.Module):
    """`InferenceEncoder.search_vectors` as a module: what the exported graph computes."""

    def __init__(self, encoder: InferenceEncoder) -> None:
        super().__init__()
        self.model = encoder.model  # registered, so export sees the weights as the module's own
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder.search_vectors(input_ids, attention_mask)


def check_exportable(encoder: InferenceEncoder, where: str) -> None:
    model_type = getattr(encoder.model.config, "model_type", None)
    if model_type not in EXPORTABLE_MODEL_TYPES:
        raise OnnxExportError(
            f"{where}: its encoder is a {model_type} model; ONNX export supports BERT encoders "
            f"(model_type {', '.join(EXPORTABLE_MODEL_TYPES)}). Use the torch backend for this model")


def _probe_inputs(encoder: InferenceEncoder) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of the encoder's own tokens, the second padded: the export's example and the check's input."""
    tokenizer = encoder.tokenizer
    texts = ["who wrote the origin of species?", "paris is the capital and largest city of france, on the seine"]
    batch = tokenizer(texts, padding=True, truncation=True, max_length=encoder.spec.sequence_length,
                      return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def export_graph(encoder: InferenceEncoder, path: str, opset: int = DEFAULT_OPSET) -> None:
    """Write the encoder's search-vector graph to `path` (one self-contained file) and check that ONNX Runtime
    gives torch's vectors on a probe batch within FP32_TOLERANCE."""
    graph = SearchVectorGraph(encoder).eval()
    example = _probe_inputs(encoder)
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    dynamic = {name: {0: batch, 1: sequence} for name in INPUT_NAMES}
    with torch.inference_mode(False), torch.no_grad(), warnings_of_the_exporter_silenced():
        torch.onnx.export(graph, example, path, input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                          opset_version=opset, dynamic_shapes=dynamic, external_data=False, verbose=False)
        expected = graph(*example).float().numpy()
    got = OnnxVectors(path, threads=1)(*example)
    difference = float(np.abs(got - expected).max())
    if not difference <= FP32_TOLERANCE:  # a bug of ours or of the exporter, not the user's: keep the traceback
        raise RuntimeError(f"the exported graph {path} differs from torch by {difference:.2e} (> {FP32_TOLERANCE})")
    logger.info("exported %s (max difference from torch on the probe batch: %.1e)", path, difference)


@contextlib.contextmanager
def warnings_of_the_exporter_silenced():
    """The dynamo exporter prints its progress and warns about axis names it renames; neither is news here."""
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        onnx_logger.setLevel(level)


def quantize_int8(fp32_path: str, int8_path: str) -> None:
    """ONNX Runtime's dynamic quantization: int8 weights (signed), activations quantized per call."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs a line per float tensor, and advice, on the root logger
    try:
        quantize_dynamic(fp32_path, int8_path, weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)


@dataclass(frozen=True)
class ExportRecord:
    """`onnx_export.json` of a folder of exported graphs."""

    model: dict  # checkpoint, weights, encoder_params
    opset: int
    files: Dict[str, dict]
    tokenization: Optional[dict] = None  # EncoderSpec.tokenization_params; None in older folders

    def to_json(self) -> dict:
        import onnxruntime

        return {"format": FORMAT, "version": VERSION, "model": self.model, "opset": self.opset,
                "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                "inputs": list(INPUT_NAMES), "output": OUTPUT_NAME, "files": self.files,
                "tokenization": self.tokenization}

    def graph_for(self, encoder_type: str, precision: str) -> Optional[str]:
        """The file holding `encoder_type`'s graph at `precision`, or None."""
        for name, entry in self.files.items():
            if encoder_type in entry["encoder_types"] and entry["precision"] == precision:
                return name
        return None


def write_export(
    encoders: Mapping[str, InferenceEncoder], folder: str, model: dict, quantize: Optional[str] = None,
    opset: int = DEFAULT_OPSET,
) -> ExportRecord:
    """Export each encoder (`encoder_type` -> encoder; one encoder under both types when the towers share it) into
    `folder` (which exists and is empty), quantized copies when `quantize="int8"`, the tokenizer and the record."""
    files: Dict[str, dict] = {}
    by_model: Dict[int, list] = {}
    for encoder_type, encoder in encoders.items():
        by_model.setdefault(id(encoder), []).append(encoder_type)
    for encoder_types in by_model.values():
        encoder = encoders[encoder_types[0]]
        fp32_name = graph_file_name(encoder_types, "fp32")
        export_graph(encoder, os.path.join(folder, fp32_name), opset)
        files[fp32_name] = {"encoder_types": encoder_types, "precision": "fp32"}
        if quantize == "int8":
            int8_name = graph_file_name(encoder_types, "int8")
            quantize_int8(os.path.join(folder, fp32_name), os.path.join(folder, int8_name))
            files[int8_name] = {"encoder_types": encoder_types, "precision": "int8"}
    first = next(iter(encoders.values()))
    first.tokenizer.save_pretrained(folder)
    record = ExportRecord(model, opset, files, first.spec.tokenization_params())
    with open(os.path.join(folder, RECORD_NAME), "w", encoding="utf-8") as file:
        json.dump(record.to_json(), file, indent=2, sort_keys=True)
    return record


def export_folder(
    encoders: Mapping[str, InferenceEncoder], out_dir: str, model: dict, quantize: Optional[str] = None,
    opset: int = DEFAULT_OPSET, keep_existing: bool = False,
) -> ExportRecord:
    """`write_export` into `out_dir`, which appears only complete (`atomic_output_directory`; `keep_existing`: a
    folder another process completed there first is kept)."""
    require_onnx("ONNX export")
    for encoder in encoders.values():
        check_exportable(encoder, model.get("checkpoint") or encoder.spec.pretrained_model_cfg)
    with atomic_output_directory(out_dir, keep_existing=keep_existing) as temp_dir:
        record = write_export(encoders, temp_dir, model, quantize, opset)
    return record


def read_export_record(folder: str, option: str) -> ExportRecord:
    """The record of a folder of exported graphs; a folder without one is an error naming `option`."""
    path = Path(folder) / RECORD_NAME
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise OnnxExportError(
            f"{option}={folder} has no {RECORD_NAME}: give a folder written by convert_dpr_checkpoint.py "
            "export-onnx") from e
    except (OSError, ValueError) as e:
        raise OnnxExportError(f"{path}: unreadable ({e}); export the checkpoint again") from e
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise OnnxExportError(f"{path} is not a record of exported ONNX graphs; export the checkpoint again")
    return ExportRecord(raw["model"], int(raw["opset"]), raw["files"], raw.get("tokenization"))


class OnnxVectors:
    """ONNX Runtime on an exported graph: token ids and mask in, float32 search vectors out (CPU), `threads`
    intra-op threads (one inter-op thread: the graph is a chain)."""

    def __init__(self, path: str, threads: int) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = max(1, int(threads))
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: ORT warns about unused initializers of the exporter
        self.path = path
        self.session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.dim = int(self.session.get_outputs()[0].shape[-1])

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> np.ndarray:
        feeds = {"input_ids": input_ids.numpy().astype(np.int64, copy=False),
                 "attention_mask": attention_mask.numpy().astype(np.int64, copy=False)}
        return self.session.run([OUTPUT_NAME], feeds)[0]
