"""DPR's extractive reader: an encoder with a span head (start/end logits per token) and a passage-relevance
head on [CLS], and its loss (marginal likelihood over the answer spans plus passage selection).

State dict keys are `encoder.*`, `qa_outputs.*` (hidden -> 2) and `qa_classifier.*` (hidden -> 1), as in
DPR's reader checkpoints.
"""
import logging
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from dpr.models.encoder_spec import EncoderSpec
from dpr.models.hf_encoder import build_encoder, encode

logger = logging.getLogger(__name__)


class Reader(nn.Module):
    """`sep_token_id` set: token type ids 0 up to and including each row's first [SEP], 1 after it (DPR's
    hydra reader; computed per row, DPR assumes two [SEP]s in every row). None: no type ids, as GC-DPR and
    the released reader checkpoint."""

    def __init__(self, encoder: nn.Module, hidden_size: int, sep_token_id: Optional[int] = None):
        super().__init__()
        self.encoder = encoder
        self.qa_outputs = nn.Linear(hidden_size, 2)
        self.qa_classifier = nn.Linear(hidden_size, 1)
        self.sep_token_id = sep_token_id
        for head in (self.qa_outputs, self.qa_classifier):
            nn.init.normal_(head.weight, mean=0.0, std=0.02)
            nn.init.zeros_(head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """input_ids [N, M, T] -> start logits [N, M, T], end logits [N, M, T], relevance logits [N, M]."""
        n, m, t = input_ids.shape
        ids, mask = input_ids.view(n * m, t), attention_mask.view(n * m, t)
        types = token_type_ids(ids, self.sep_token_id) if self.sep_token_id is not None else None
        sequence_output, _ = encode(self.encoder, ids, mask, types)
        start_logits, end_logits = self.qa_outputs(sequence_output).unbind(dim=-1)
        relevance_logits = self.qa_classifier(sequence_output[:, 0, :]).squeeze(-1)
        return start_logits.view(n, m, t), end_logits.view(n, m, t), relevance_logits.view(n, m)


def token_type_ids(input_ids: torch.Tensor, sep_token_id: int) -> torch.Tensor:
    """[B, T]: 0 up to and including the row's first [SEP], 1 after it (a row without [SEP] is all 0)."""
    is_sep = input_ids == sep_token_id
    first_sep = torch.where(is_sep.any(dim=1), is_sep.int().argmax(dim=1), input_ids.shape[1])
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (positions.unsqueeze(0) > first_sep.unsqueeze(1)).long()


def build_reader(spec: EncoderSpec, sep_token_id: Optional[int] = None, load_pretrained: bool = True) -> Reader:
    """The Reader an encoder spec describes (no projection: the heads read the hidden states). `sep_token_id`
    is needed when `spec.token_type_ids`; `load_pretrained=False` skips reading weights a checkpoint will replace."""
    if spec.token_type_ids and sep_token_id is None:
        raise ValueError("encoder.token_type_ids needs the tokenizer's [SEP] id")
    encoder = build_encoder(
        spec.pretrained_model_cfg,
        projection_dim=0,
        dropout=spec.dropout or 0.0,
        pretrained=load_pretrained and spec.pretrained,
    )
    return Reader(encoder, encoder.config.hidden_size, sep_token_id if spec.token_type_ids else None)


def reader_loss(
    start_positions: torch.Tensor,
    end_positions: torch.Tensor,
    answers_mask: torch.Tensor,
    start_logits: torch.Tensor,
    end_logits: torch.Tensor,
    relevance_logits: torch.Tensor,
) -> torch.Tensor:
    """DPR's reader loss, summed over the N questions.

    positions and answers_mask [N, M, A] (answers in passage row 0, the positive); logits [N, M, T] and [N, M].
    Switch loss: cross-entropy of the relevance logits with the positive (row 0) as target. Span loss, per
    answer a: CE(start, s_a) + CE(end, e_a); the positive row is taken (max over M: other rows are masked to 0);
    then -log sum_a exp(-loss_a) over the answers that are unmasked and inside the sequence (DPR drops these
    as zero losses), 0 for a question without one. DPR sums exp(-loss_a) directly, which underflows to a zero
    loss when every answer's loss is above ~87; logsumexp gives the same value without underflowing.
    """
    n, m, t = start_logits.shape
    switch_loss = F.cross_entropy(relevance_logits.float(),
                                  torch.zeros(n, dtype=torch.long, device=relevance_logits.device), reduction="sum")
    counted = answers_mask.bool() & (start_positions < t) & (end_positions < t)
    span = (_position_nll(start_logits, start_positions) + _position_nll(end_logits, end_positions)) * counted
    span = span.max(dim=1).values  # [N, A]
    valid = counted.any(dim=1)
    log_likelihood = torch.logsumexp((-span).masked_fill(~valid, float("-inf")), dim=1)
    span_loss = -torch.where(valid.any(dim=1), log_likelihood, torch.zeros_like(log_likelihood)).sum()
    return span_loss + switch_loss


def _position_nll(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[position] per answer slot, [N, M, A] (positions past T read position T-1; the
    caller masks them)."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return -log_probs.gather(-1, positions.clamp(0, logits.shape[-1] - 1))
