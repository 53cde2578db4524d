"""Model FLOPs and model FLOPs utilisation (MFU) for the training logs, as nanoGPT reports them.

Model FLOPs per sequence of T real tokens: 6·N·T + 12·layers·hidden·T² for a trained encoder (forward and
backward; N = non-embedding parameters), a third of that for a frozen one. T is each row's own length, the sum of
its attention mask, not the padded width of the batch: padding is not useful work, and counting it reported 1.7x
the real FLOPs on squad_open at batch 32 (and CPU rates above the machine's matmul peak). The gradient cache's
extra forward pass is not counted either: MFU measures useful work. The reader's small heads are left out.
"""
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

# Dense bf16/fp16 tensor-core peaks in TFLOPS, by device name.
PEAK_TFLOPS_16BIT = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "V100": 125.0}


def _non_embedding_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if "embeddings" not in name and "pooler" not in name)


@dataclass(frozen=True)
class EncoderCost:
    params: int  # non-embedding parameters
    layers_hidden: int  # layers x hidden size
    passes: int  # 3 when trained (forward and backward), 1 when frozen

    @classmethod
    def of(cls, model: torch.nn.Module, trains: bool) -> "EncoderCost":
        cfg = model.config
        return cls(_non_embedding_params(model), cfg.num_hidden_layers * cfg.hidden_size, 3 if trains else 1)

    def flops(self, attention_mask: torch.Tensor) -> float:
        """Of the rows of attention_mask (..., width), each at its real length; 0 for no rows (a reader batch whose
        questions all lack a usable positive)."""
        if attention_mask.numel() == 0:
            return 0.0
        lengths = attention_mask.reshape(-1, attention_mask.shape[-1]).sum(-1, dtype=torch.float64)
        return self.passes * float((2 * self.params * lengths + 4 * self.layers_hidden * lengths * lengths).sum())


class ModelFlops:
    """The model FLOPs of sequences through the encoders a trainer runs, and the device's peak for MFU."""

    def __init__(self, encoders: Sequence[Tuple[torch.nn.Module, bool]], device: torch.device, precision: str,
                 peak_tflops: Optional[float] = None):
        self.encoders = [EncoderCost.of(model, trains) for model, trains in encoders]
        self.peak = peak_tflops
        if self.peak is None and device.type == "cuda" and precision in ("fp16", "bf16"):
            name = torch.cuda.get_device_name(device)
            self.peak = next((v for k, v in PEAK_TFLOPS_16BIT.items() if k in name), None)

    @classmethod
    def of_biencoder(cls, biencoder, device: torch.device, precision: str,
                     peak_tflops: Optional[float] = None) -> "ModelFlops":
        towers = zip((biencoder.question_model, biencoder.ctx_model), biencoder.trainable_towers())
        return cls(list(towers), device, precision, peak_tflops)

    def of_sequences(self, encoder: int, attention_mask: torch.Tensor) -> float:
        return self.encoders[encoder].flops(attention_mask)

    def of_biencoder_batch(self, batch) -> float:
        return self.of_sequences(0, batch.question_mask) + self.of_sequences(1, batch.context_mask)

    def utilisation(self, flops: float, seconds: float) -> Tuple[float, Optional[float]]:
        """(achieved TFLOPS, MFU in percent of the peak, or None when the peak is unknown)."""
        tflops = flops / max(seconds, 1e-9) / 1e12
        return tflops, (100.0 * tflops / self.peak if self.peak else None)
