"""What the bench scripts share: the bi-encoder they train (random bert weights, dropout 0.1), synthetic batches,
the two towers and the step through the gradient cache or the full batch, the trainers' optimizer step, and the
precision of a device. bench/gpu_check.py and bench/bench_memory.py import it; it imports neither, so no bench
script imports another that imports it back (tests/test_bench_imports.py checks there is no circle).

Imports only torch, transformers and dpr's models, batches, gradient cache, optimizer and precision, as
bench/gpu_check.py's doc says the GPU machine has.
"""
import sys
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # this checkout's dpr, not an editable install elsewhere

import torch  # noqa: E402
from transformers import BertConfig  # noqa: E402

from dpr.data.biencoder_batch import CONTEXT_DROPOUT, QUESTION_DROPOUT, BiEncoderBatch  # noqa: E402
from dpr.data.biencoder_data import example_seed  # noqa: E402
from dpr.models.biencoder import BiEncoder, nll_loss  # noqa: E402
from dpr.models.hf_encoder import enable_gradient_checkpointing, encoder_from_config  # noqa: E402
from dpr.training.grad_cache import GradCache, Tower, full_batch_step  # noqa: E402
from dpr.training.optim import build_optimizer  # noqa: E402
from dpr.foundation.precision import Precision, make_precision  # noqa: E402

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def precision_for(device: torch.device, name: str) -> Precision:
    if name == "fp16" and device.type == "cpu":
        # make_precision refuses fp16 on CPU; the --cpu run still walks the GradScaler code
        return Precision("fp16", partial(torch.autocast, "cpu", dtype=torch.float16), torch.amp.GradScaler("cpu"))
    return make_precision(device, fp16=name == "fp16", bf16=name == "bf16")


def build_model(config: BertConfig, sequence_length: int, device: torch.device,
                gradient_checkpointing: bool = False) -> BiEncoder:
    """Two randomly initialised encoders with dropout 0.1, as build_biencoder makes them; with
    `gradient_checkpointing` their layers recompute activations in backward, as the trainer sets them."""
    torch.manual_seed(0)
    towers = [encoder_from_config(BertConfig.from_dict(config.to_dict()), dropout=0.1) for _ in range(2)]
    if gradient_checkpointing:
        for tower in towers:
            enable_gradient_checkpointing(tower)
    return BiEncoder(*towers, sequence_length).to(device).train()


def synthetic_batch(questions: int, vocab_size: int, sequence_length: int, seed: int = 0) -> BiEncoderBatch:
    """Random token ids: questions of 12-40 tokens and, per question, a positive and a hard negative of 160-256
    (both cut to `sequence_length`); per-example dropout seeds as make_biencoder_batch gives them."""
    generator = torch.Generator().manual_seed(seed)

    def rows(n: int, shortest: int, longest: int):
        lengths = torch.randint(min(shortest, sequence_length), min(longest, sequence_length) + 1, (n,),
                                generator=generator)
        width = int(lengths.max())
        ids = torch.randint(len(SPECIAL_TOKENS), vocab_size, (n, width), generator=generator)
        mask = (torch.arange(width) < lengths[:, None]).long()
        ids[:, 0] = SPECIAL_TOKENS.index("[CLS]")
        return ids * mask, mask  # [PAD] is 0

    q_ids, q_mask = rows(questions, 12, 40)
    c_ids, c_mask = rows(2 * questions, 160, 256)
    return BiEncoderBatch(
        question_ids=q_ids, question_mask=q_mask, context_ids=c_ids, context_mask=c_mask,
        positive_indices=torch.arange(questions) * 2,
        hard_negative_indices=[[2 * i + 1] for i in range(questions)],
        question_seeds=[example_seed(seed, 0, i, QUESTION_DROPOUT) for i in range(questions)],
        context_seeds=[example_seed(seed, 0, i, CONTEXT_DROPOUT + slot) for i in range(questions) for slot in (0, 1)],
    )


def make_towers(model: BiEncoder, batch: BiEncoderBatch, q_chunk: int, ctx_chunk: int, example_dropout: bool):
    """The two towers as the bi-encoder trainer builds them; without per-example seeds dropout is standard."""
    def tower(encode_rows, ids, mask, seeds, chunk):
        inputs = {"input_ids": ids, "attention_mask": mask}
        if example_dropout:
            inputs["seeds"] = seeds
        return Tower(lambda c: encode_rows(c["input_ids"], c["attention_mask"], c.get("seeds")), inputs, chunk)

    return [tower(model.encode_questions, batch.question_ids, batch.question_mask, batch.question_seeds, q_chunk),
            tower(model.encode_contexts, batch.context_ids, batch.context_mask, batch.context_seeds, ctx_chunk)]


def forward_backward(model, batch, precision: Precision, cache: bool, q_chunk: int, ctx_chunk: int,
                     example_dropout: bool = True) -> float:
    towers = make_towers(model, batch, q_chunk, ctx_chunk, example_dropout)
    if cache:
        loss, _ = GradCache(nll_loss, precision.autocast, precision.grad_scaler)(
            towers, positive_indices=batch.positive_indices)
    else:
        loss, _ = full_batch_step(towers, nll_loss, 1.0, precision.autocast, precision.grad_scaler,
                                  positive_indices=batch.positive_indices)
    return float(loss)


def optimizer_step(model, optimizer, precision: Precision, max_norm: float = 2.0) -> None:
    """The trainers' step (dpr/training/trainer_base.py) on one process: unscale, clip, step, zero."""
    scaler = precision.grad_scaler
    if scaler is not None:
        scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def new_optimizer(model):
    return build_optimizer(model, 1e-5, 1e-8, 0.01, (0.9, 0.999))

