"""Mixed precision: torch.amp autocast, with a GradScaler for fp16."""
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Callable, ContextManager, Optional

import torch

from dpr.foundation.errors import ConfigError


@dataclass
class Precision:
    name: str  # fp32, fp16 or bf16
    autocast: Callable[[], ContextManager]
    grad_scaler: Optional[torch.amp.GradScaler]


def make_precision(device: torch.device, fp16: bool = False, bf16: bool = False) -> Precision:
    """fp16 runs under autocast with a GradScaler (gradients scaled once, unscaled before clipping, steps with
    inf/nan gradients skipped); bf16 under autocast alone. fp16 needs CUDA: on CPU it is refused in one line (a
    ConfigError), not silently run in another precision."""
    if fp16 and bf16:
        raise ConfigError("fp16=true and bf16=true: choose one of them")
    if fp16:
        if device.type != "cuda":
            raise ConfigError("fp16 needs a CUDA device (loss scaling on CPU is not supported); use bf16=true on CPU")
        return Precision("fp16", partial(torch.autocast, "cuda", dtype=torch.float16), torch.amp.GradScaler("cuda"))
    if bf16:
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("this GPU does not support bf16: use fp16=true instead of bf16=true")
        return Precision("bf16", partial(torch.autocast, device.type, dtype=torch.bfloat16), None)
    return Precision("fp32", nullcontext, None)
