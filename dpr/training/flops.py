"""Achieved model FLOPs and model FLOPs utilisation (MFU) for the training logs, as nanoGPT reports them.

Model FLOPs per sequence of T tokens: 6·N·T + 12·layers·hidden·T² for a trained encoder (forward and backward;
N = non-embedding parameters), a third of that for a frozen one. The gradient cache's extra forward pass is
not counted: MFU measures useful work.
"""
from typing import Optional

import torch

# Dense bf16/fp16 tensor-core peaks in TFLOPS, by device name.
PEAK_TFLOPS_16BIT = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "V100": 125.0}


def _non_embedding_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if "embeddings" not in name and "pooler" not in name)


class FlopsCounter:
    def __init__(self, biencoder, device: torch.device, precision: str, peak_tflops: Optional[float] = None):
        self.towers = []
        trainable = biencoder.trainable_towers()
        for model, trains in zip((biencoder.question_model, biencoder.ctx_model), trainable):
            cfg = model.config
            self.towers.append((_non_embedding_params(model), cfg.num_hidden_layers * cfg.hidden_size, 3 if trains else 1))
        self.peak = peak_tflops
        if self.peak is None and device.type == "cuda" and precision in ("fp16", "bf16"):
            name = torch.cuda.get_device_name(device)
            self.peak = next((v for k, v in PEAK_TFLOPS_16BIT.items() if k in name), None)
        self.flops = 0.0

    def _sequence_flops(self, tower: int, rows: int, width: int) -> float:
        params, layers_hidden, passes = self.towers[tower]
        return passes * rows * (2 * params * width + 4 * layers_hidden * width * width)

    def add_batch(self, batch) -> None:
        self.flops += self._sequence_flops(0, *batch.question_ids.shape)
        self.flops += self._sequence_flops(1, *batch.context_ids.shape)

    def reset(self) -> None:
        self.flops = 0.0

    def report(self, seconds: float) -> str:
        tflops = self.flops / max(seconds, 1e-9) / 1e12
        text = f"tflops={tflops:.3f}"
        if self.peak:
            text += f", mfu={100.0 * tflops / self.peak:.2f}%"
        return text
