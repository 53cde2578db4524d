"""`convert_dpr_checkpoint.py export-onnx`: a bi-encoder checkpoint -> ONNX graphs whose output is the retrieval
vector (`dpr.models.onnx_graph`), with the tokenizer and a record of what they are (see docs/interop.md)."""
import os
from pathlib import Path
from typing import Optional

from dpr.indexing.shard_provenance import model_record
from dpr.interop.hf_dpr import ConversionReport
from dpr.models.loading import load_checkpoint_biencoder
from dpr.models.onnx_graph import DEFAULT_OPSET, RECORD_NAME, OnnxExportError, export_folder, require_onnx


def check_out_dir(out_dir: str, overwrite: bool) -> None:
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise OnnxExportError(f"OUT_DIR {out_dir} is a file: give a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise OnnxExportError(
            f"OUT_DIR {out_dir} is not empty: give a new or empty folder, or --overwrite to replace its content")


def export_onnx(
    checkpoint_path: str, out_dir: str, pretrained_model_cfg: Optional[str] = None, quantize: Optional[str] = None,
    overwrite: bool = False, trust_checkpoint: bool = False, opset: int = DEFAULT_OPSET,
) -> ConversionReport:
    """`out_dir/question_encoder.onnx` and `ctx_encoder.onnx` (`encoder.onnx` when the checkpoint's towers share
    one encoder), their int8 copies with `quantize="int8"`, the tokenizer and `onnx_export.json`; the folder
    appears only complete. `pretrained_model_cfg` overrides the base model the checkpoint names (a released
    checkpoint names a hub model that may not be here); `load_checkpoint_biencoder` reads the checkpoint, as for
    the other exports."""
    require_onnx("convert_dpr_checkpoint.py export-onnx")
    check_out_dir(out_dir, overwrite)
    encoders = load_checkpoint_biencoder(checkpoint_path, pretrained_model_cfg, trust_checkpoint).inference_encoders()
    record = export_folder(encoders, out_dir, model_record(encoders["question"], checkpoint_path), quantize, opset)
    return ConversionReport(written=[os.path.join(out_dir, name) for name in [*record.files, RECORD_NAME]])
