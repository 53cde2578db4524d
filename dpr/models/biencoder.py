"""The bi-encoder: a question encoder and a context encoder, and DPR's in-batch-negative NLL loss."""
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from dpr.models.example_dropout import example_seeds
from dpr.models.encoder_spec import EncoderSpec, check_fits_model
from dpr.models.hf_encoder import build_encoder, encode, encoder_out_size


class BiEncoder(nn.Module):
    """Two independent encoders (or one shared, an extension). State dict keys are `question_model.*` and
    `ctx_model.*`, as in DPR checkpoints. With one shared encoder both prefixes name the same tensors, which
    torch.save stores once: the checkpoint holds one model's weights and still loads in DPR's two-tower form."""

    def __init__(
        self,
        question_model: nn.Module,
        ctx_model: nn.Module,
        sequence_length: int,
        fix_ctx_encoder: bool = False,
        pooling: str = "cls",
        compile_dropout: bool = False,
    ):
        super().__init__()
        self.question_model = question_model
        self.ctx_model = ctx_model
        self.sequence_length = sequence_length
        self.fix_ctx_encoder = fix_ctx_encoder
        self.pooling = pooling
        self.compile_dropout = compile_dropout  # per-example dropout by its compiled kernel (the same masks)

    @property
    def shares_encoders(self) -> bool:
        return self.question_model is self.ctx_model

    def _encode(self, model, ids, mask, seeds: Optional[Sequence[int]]) -> torch.Tensor:
        if ids.shape[0] == 0:
            return torch.zeros(0, encoder_out_size(model), device=ids.device)
        with example_seeds(seeds if self.training else None, ids.device, self.sequence_length, self.compile_dropout):
            return encode(model, ids, mask, pooling=self.pooling)[1]

    def encode_questions(self, ids, mask, seeds: Optional[Sequence[int]] = None) -> torch.Tensor:
        return self._encode(self.question_model, ids, mask, seeds)

    def encode_contexts(self, ids, mask, seeds: Optional[Sequence[int]] = None) -> torch.Tensor:
        if self.fix_ctx_encoder:
            with torch.no_grad():
                return self._encode(self.ctx_model, ids, mask, seeds)
        return self._encode(self.ctx_model, ids, mask, seeds)

    def trainable_towers(self) -> Tuple[bool, bool]:
        """Whether the question and context towers need a backward pass."""
        return True, not self.fix_ctx_encoder


def similarity_scores(q: torch.Tensor, ctx: torch.Tensor, similarity: str = "dot", temperature: float = 1.0):
    """[Nq, Nc] scores. `dot` is DPR's; `cosine` (an extension) is the dot product of L2-normalised vectors
    divided by `temperature`."""
    scores = search_vectors(q, similarity) @ search_vectors(ctx, similarity).T
    return scores if similarity == "dot" else scores / temperature


def search_vectors(vectors: torch.Tensor, similarity: str = "dot") -> torch.Tensor:
    """Vectors whose inner product is the similarity: as they are for `dot`, L2-normalised for `cosine`, so an
    inner-product index ranks by cosine and its scores are cosines. The temperature is left out: dividing every
    score by the same positive number changes no ranking (and keeps the scores in [-1, 1])."""
    if similarity == "dot":
        return vectors
    if similarity == "cosine":
        return F.normalize(vectors, dim=-1)
    raise ValueError(f"unknown similarity '{similarity}' (choose dot or cosine)")


def nll_loss(
    q: torch.Tensor,
    ctx: torch.Tensor,
    positive_indices: torch.Tensor,
    similarity: str = "dot",
    temperature: float = 1.0,
    masked: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, int]:
    """DPR's loss: mean over questions of -log softmax(score of the positive) against every context of the
    (global) batch; returns (loss, number of questions whose positive scores highest). `masked` ([Nq, Nc] bool,
    never true at a question's positive) takes contexts out of a question's softmax: their scores become -inf, so
    the loss is that of the batch without them, and no gradient reaches them through that question."""
    scores = similarity_scores(q, ctx, similarity, temperature)
    if masked is not None:
        scores = scores.masked_fill(masked.to(scores.device), float("-inf"))
    log_probs = F.log_softmax(scores, dim=1)
    loss = F.nll_loss(log_probs, positive_indices, reduction="mean")
    correct = int((log_probs.argmax(dim=1) == positive_indices).sum())
    return loss, correct


def build_biencoder(spec: EncoderSpec, compile_dropout: bool = False) -> BiEncoder:
    """The BiEncoder a spec describes: two encoders, or one shared by both towers; `compile_dropout` draws
    per-example dropout with the compiled kernel."""
    def one_encoder():
        return build_encoder(spec.pretrained_model_cfg, spec.projection_dim, spec.dropout, spec.pretrained)

    question_model = one_encoder()
    check_fits_model(spec, getattr(question_model.config, "max_position_embeddings", None))
    ctx_model = question_model if spec.share_encoders else one_encoder()
    # the longest row either tower sees: per-example dropout numbers elements at this length
    longest = max(spec.sequence_length, spec.question_length)
    return BiEncoder(
        question_model, ctx_model, longest, fix_ctx_encoder=spec.fix_ctx_encoder, pooling=spec.pooling,
        compile_dropout=compile_dropout,
    )
