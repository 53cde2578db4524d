"""DPR-format checkpoints: writing them safely, finding the newest, reading released ones tolerantly.

A checkpoint is `torch.save` of {model_dict, optimizer_dict, scheduler_dict, offset, epoch, encoder_params}
holding plain Python values only, so `torch.load(path, weights_only=True)` reads it.
"""
import glob
import logging
import os
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional

import torch
from omegaconf import DictConfig, open_dict
from torch import nn

from dpr.models.hf_encoder import MINILM_ALIASES
from dpr.utils.files import atomic_output

logger = logging.getLogger(__name__)

# encoder_params keys of GC-DPR / old DPR checkpoints (the format of the released files), flat.
LEGACY_ENCODER_PARAMS = ("pretrained_model_cfg", "encoder_model_type", "pretrained_file", "projection_dim", "sequence_length")


@dataclass
class CheckpointState:
    model_dict: Dict[str, torch.Tensor]
    optimizer_dict: Optional[dict]
    scheduler_dict: Optional[dict]
    offset: int
    epoch: int
    encoder_params: Dict[str, Any]


def checkpoint_path(output_dir: str, name: str, epoch: int, offset: int = 0) -> str:
    """`{name}.{epoch}` at the end of an epoch, `{name}.{epoch}.{offset}` in the middle (GC-DPR's names)."""
    suffix = f"{epoch}.{offset}" if offset else f"{epoch}"
    return os.path.join(output_dir, f"{name}.{suffix}")


def save_checkpoint(path: str, state: CheckpointState) -> str:
    """Write to a temporary file in the same folder, then rename: a crash mid-save leaves older files intact."""
    with atomic_output(path) as temp_name, open(temp_name, "wb") as f:
        torch.save(asdict(state), f)
    logger.info("Saved checkpoint at %s", path)
    return path


def find_latest_checkpoint(output_dir: Optional[str], name: str) -> Optional[str]:
    """The newest `{name}*` file in output_dir, as DPR resumes from it when no model_file is given."""
    if not output_dir or not os.path.isdir(output_dir):
        return None
    files = [f for f in glob.glob(os.path.join(output_dir, glob.escape(name) + "*")) if os.path.isfile(f)]
    return max(files, key=os.path.getmtime) if files else None


def load_checkpoint(path: str) -> CheckpointState:
    """Read a checkpoint written here or by DPR/GC-DPR. Hydra-DPR files pickle an omegaconf object in
    encoder_params, which weights_only loading refuses; those are read with full unpickling and a warning
    (unpickling runs code from the file: only do it for files you trust)."""
    logger.info("Reading checkpoint %s", path)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError subclasses and RuntimeError here
        logger.warning("%s holds pickled objects (%s); loading it with weights_only=False", path, type(e).__name__)
        raw = torch.load(path, map_location="cpu", weights_only=False)
    return CheckpointState(
        model_dict=raw["model_dict"],
        optimizer_dict=raw.get("optimizer_dict"),
        scheduler_dict=raw.get("scheduler_dict"),
        offset=int(raw.get("offset", 0)),
        epoch=int(raw.get("epoch", 0)),
        encoder_params=normalize_encoder_params(raw.get("encoder_params") or {}),
    )


def normalize_encoder_params(params: Any) -> Dict[str, Any]:
    """{"do_lower_case": bool, "encoder": {...}} from DPR's form (encoder may be an omegaconf object) or from the
    old flat form of the released checkpoints, as plain values."""
    if hasattr(params, "items") and not isinstance(params, dict):
        params = dict(params.items())
    params = dict(params)
    encoder = params.get("encoder")
    if encoder is not None:
        try:
            from omegaconf import OmegaConf

            if OmegaConf.is_config(encoder):
                encoder = OmegaConf.to_container(encoder, resolve=True)
        except ImportError:
            pass
        encoder = dict(encoder)
    else:
        encoder = {k: params[k] for k in LEGACY_ENCODER_PARAMS if k in params}
        if encoder:
            logger.info("Checkpoint has old flat encoder_params: %s", sorted(encoder))
    out = {"encoder": encoder}
    if "do_lower_case" in params:
        out["do_lower_case"] = bool(params["do_lower_case"])
    return out


def strip_prefix(state: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def load_model_state(model: nn.Module, state: Dict[str, torch.Tensor], strict: bool = True) -> None:
    """Load a state dict across transformers versions: `embeddings.position_ids` present in old files and absent
    in new models (or the reverse) is dropped or kept from the model; pooler weights load when the model has a
    pooler and are dropped otherwise. What was adapted is reported; anything else missing or unexpected is an
    error when strict."""
    own = model.state_dict()
    state = dict(state)
    adapted: List[str] = []
    for key in list(state):
        if key not in own and (key.endswith("embeddings.position_ids") or ".pooler." in f".{key}"):
            del state[key]
            adapted.append(f"dropped {key}")
    for key in own:
        if key not in state and key.endswith("embeddings.position_ids"):
            state[key] = own[key]
            adapted.append(f"kept the model's {key}")
    if adapted:
        logger.info("Checkpoint adapted to this transformers version: %s", "; ".join(adapted))
    result = model.load_state_dict(state, strict=False)
    problems = []
    if result.missing_keys:
        problems.append(f"missing keys: {result.missing_keys[:10]}{' ...' if len(result.missing_keys) > 10 else ''}")
    if result.unexpected_keys:
        problems.append(f"unexpected keys: {result.unexpected_keys[:10]}")
    if problems:
        message = "checkpoint does not fit the model: " + "; ".join(problems)
        if strict:
            raise RuntimeError(message)
        logger.warning(message)


def apply_encoder_params(cfg: DictConfig, params: dict) -> None:
    """A checkpoint's encoder settings override the configuration, as in DPR; a saved model path that does not
    exist on this machine is replaced by the configured one, with a warning."""
    saved = dict(params.get("encoder") or {})
    with open_dict(cfg):
        for key, value in saved.items():
            if key == "pretrained_model_cfg" and value != cfg.encoder.get(key):
                if not (os.path.exists(str(value)) or str(value).lower() in MINILM_ALIASES or "/" not in str(value)):
                    logger.warning("checkpoint's encoder %s is not here; using %s", value, cfg.encoder.get(key))
                    continue
            if key in cfg.encoder and cfg.encoder.get(key) != value:
                logger.info("Overriding encoder.%s from the checkpoint: %s -> %s", key, cfg.encoder.get(key), value)
            cfg.encoder[key] = value
        if "do_lower_case" in params:
            cfg.do_lower_case = params["do_lower_case"]
