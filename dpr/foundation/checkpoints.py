"""DPR-format checkpoints: writing them safely, finding the newest, reading released ones tolerantly.

A checkpoint is `torch.save` of {model_dict, optimizer_dict, scheduler_dict, offset, epoch, encoder_params}
(encoder_params in DPR's shape, plus `tokenizer`: the identity of the tokenizer it was trained with) holding plain
Python values only, so `torch.load(path, weights_only=True)` reads it. DPR's own files also pickle an
omegaconf DictConfig in encoder_params: those few omegaconf classes are admitted too, and nothing else, so a file
carrying any other object is refused instead of run (unless the user says they trust it).
"""
import collections
import errno
import logging
import os
import pickle
import re
import shutil
import typing
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Optional

import torch
from omegaconf import DictConfig, ListConfig
from omegaconf.base import ContainerMetadata, Metadata
from omegaconf.nodes import AnyNode, BooleanNode, FloatNode, IntegerNode, StringNode
from torch import nn

from dpr.foundation.errors import UserInputError
from dpr.foundation.files import atomic_output

logger = logging.getLogger(__name__)

# encoder_params keys of GC-DPR / old DPR checkpoints (the format of the released files), flat.
LEGACY_ENCODER_PARAMS = ("pretrained_model_cfg", "encoder_model_type", "pretrained_file", "projection_dim", "sequence_length")


# Beyond tensors and plain values, what DPR's checkpoints pickle: cfg.encoder as an omegaconf DictConfig, whose
# nodes and metadata name these classes and the types they hold.
DPR_CHECKPOINT_GLOBALS = [
    DictConfig, ListConfig, ContainerMetadata, Metadata,
    AnyNode, StringNode, IntegerNode, FloatNode, BooleanNode,
    typing.Any, collections.defaultdict, dict, list, str, int, float, bool,
]
# torch's words for a global outside the admitted set ("Unsupported global: GLOBAL x.y", or "unsupported GLOBAL
# x.y whose module x is blocked")
_REFUSED_GLOBAL = re.compile(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)")


class CheckpointError(UserInputError):
    """A checkpoint file that is missing, unreadable, or holds objects a checkpoint should not."""


class UnreadableCheckpointError(CheckpointError):
    """A checkpoint file that is empty, truncated or not a checkpoint at all (as opposed to one that is refused for
    what it holds)."""


class CheckpointWriteError(UserInputError):
    """A checkpoint that could not be written (a full disk, mostly); older checkpoints are intact."""


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
    """Write to a temporary file in the same folder, then rename: a crash mid-save leaves older files intact.
    A failed write (torch reports a full disk as "[enforce fail at inline_container.cc] unexpected pos") is a
    CheckpointWriteError naming the file, the cause and the free space."""
    # A shallow dict, not dataclasses.asdict: that deep-copies every tensor (doubling the weights' memory during
    # a save, and writing storage that tensors share once per tensor).
    content = {f.name: getattr(state, f.name) for f in fields(state)}
    try:
        with atomic_output(path) as temp_name, open(temp_name, "wb") as f:
            torch.save(content, f)
    except (OSError, RuntimeError) as e:
        raise CheckpointWriteError(
            f"could not write checkpoint {path}: {_write_failure_cause(e, os.path.dirname(path) or '.', content)}; "
            "older checkpoints are intact"
        ) from e
    logger.info("Saved checkpoint at %s", path)
    return path


def _write_failure_cause(error: BaseException, folder: str, content: dict) -> str:
    free = shutil.disk_usage(folder).free
    needed = _tensor_bytes(content)
    if getattr(error, "errno", None) == errno.ENOSPC or free < needed:
        return (f"no space left on device ({free / 2**20:.0f} MB free in {folder}, the checkpoint needs about "
                f"{needed / 2**20:.0f} MB): free some space or choose another output_dir")
    return f"{_first_line(error)} ({free / 2**20:.0f} MB free in {folder})"


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def checkpoints_newest_first(output_dir: Optional[str], name: str) -> List[str]:
    """The checkpoints `{name}`, `{name}.{epoch}` and `{name}.{epoch}.{offset}` in output_dir, newest first: DPR
    resumes from the newest when no model_file is given."""
    if not output_dir or not os.path.isdir(output_dir):
        return []
    pattern = re.compile(re.escape(name) + r"(\.\d+)*")
    files = [os.path.join(output_dir, f) for f in os.listdir(output_dir) if pattern.fullmatch(f)]
    return sorted((f for f in files if os.path.isfile(f)), key=os.path.getmtime, reverse=True)


def load_checkpoint(path: str, trust: bool = False) -> CheckpointState:
    """Read a checkpoint written here or by DPR/GC-DPR without running code from it: torch's weights-only loader
    with DPR's omegaconf classes admitted. Any other object is refused with a CheckpointError naming the file and
    the class; `trust=True` (the `trust_checkpoint` option) unpickles such a file fully, with a warning."""
    logger.info("Reading checkpoint %s", path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    if os.path.getsize(path) == 0:
        raise UnreadableCheckpointError(f"checkpoint {path} is empty (0 bytes): an interrupted copy or write?")
    try:
        with torch.serialization.safe_globals(DPR_CHECKPOINT_GLOBALS):
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = _REFUSED_GLOBAL.search(str(e))
        if refused is None:
            raise UnreadableCheckpointError(f"checkpoint {path} is truncated or not a checkpoint: {_first_line(e)}") from e
        what = refused.group(1)
        if not trust:
            raise CheckpointError(
                f"checkpoint {path} holds {what}, which DPR checkpoints do not; loading it could run code "
                "from the file. If you trust the file, set trust_checkpoint=true"
            ) from e
        logger.warning("%s holds %s; unpickling it fully because trust_checkpoint=true", path, what)
        raw = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError) as e:  # torch's zip reader raises RuntimeError
        raise UnreadableCheckpointError(f"checkpoint {path} is truncated or not a checkpoint: {_first_line(e)}") from e
    if not isinstance(raw, dict) or "model_dict" not in raw:
        found = sorted(raw)[:8] if isinstance(raw, dict) else type(raw).__name__
        raise UnreadableCheckpointError(f"{path} is not a DPR checkpoint: no model_dict (found {found})")
    return CheckpointState(
        model_dict=raw["model_dict"],
        optimizer_dict=raw.get("optimizer_dict"),
        scheduler_dict=raw.get("scheduler_dict"),
        offset=int(raw.get("offset", 0)),
        epoch=int(raw.get("epoch", 0)),
        encoder_params=normalize_encoder_params(raw.get("encoder_params") or {}),
    )


def _first_line(error: BaseException) -> str:
    """The first sentence of an error message (after torch's "WeightsUnpickler error:" preamble, if any): torch's
    messages go on for a paragraph."""
    text = str(error).split("WeightsUnpickler error:")[-1]
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return re.split(r"(?<=\.)\s", lines[0])[0] if lines else type(error).__name__


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
    if isinstance(params.get("tokenizer"), dict):  # the tokenizer's identity (`hf_encoder.tokenizer_identity`)
        out["tokenizer"] = dict(params["tokenizer"])
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
