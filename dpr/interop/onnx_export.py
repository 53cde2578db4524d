"""`convert_dpr_checkpoint.py export-onnx`: a bi-encoder checkpoint -> ONNX graphs whose output is the retrieval
vector (`dpr.models.onnx_graph`), with the tokenizer and a record of what they are (see docs/interop.md)."""
import dataclasses
import os
from pathlib import Path
from typing import Optional

from dpr.foundation.checkpoints import load_checkpoint
from dpr.indexing.shard_provenance import model_record
from dpr.interop.hf_dpr import ConversionReport
from dpr.models.encoder_spec import EncoderSpec
from dpr.models.loading import checkpoint_encoder
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
    checkpoint names a hub model that may not be here)."""
    require_onnx("convert_dpr_checkpoint.py export-onnx")
    check_out_dir(out_dir, overwrite)
    ckpt = load_checkpoint(checkpoint_path, trust_checkpoint)
    name = pretrained_model_cfg or ckpt.encoder_params.get("encoder", {}).get("pretrained_model_cfg")
    if not name:
        raise OnnxExportError(f"{checkpoint_path} names no pretrained model: give --pretrained_model_cfg")
    spec = EncoderSpec(name).with_checkpoint_params(ckpt.encoder_params)
    if pretrained_model_cfg:
        spec = dataclasses.replace(spec, pretrained_model_cfg=pretrained_model_cfg)
    try:
        question = checkpoint_encoder(ckpt, spec, "question", checkpoint_path)
    except OSError as e:  # transformers cannot read the base model's configuration
        raise OnnxExportError(
            f"cannot read the base model '{spec.pretrained_model_cfg}' of {checkpoint_path} ({e}); give "
            "--pretrained_model_cfg: a local folder with the config and tokenizer it was trained from") from e
    ctx = question if spec.share_encoders else checkpoint_encoder(ckpt, spec, "ctx", checkpoint_path)
    record = export_folder({"question": question, "ctx": ctx}, out_dir, model_record(question, checkpoint_path),
                           quantize, opset)
    return ConversionReport(written=[os.path.join(out_dir, name) for name in [*record.files, RECORD_NAME]])
