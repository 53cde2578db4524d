"""Recall@k and MRR@10 of a score matrix, exact, with torch alone: training validates by retrieval with them and
must not need the metrics extra (ir-measures). tests/test_val_retrieval.py proves them equal to ir-measures' R@k
and RR@10 on the same ranking.

- Recall@k: the fraction of a question's relevant passages ranked in its top k (ir-measures' R@k), averaged over
  questions.
- MRR@10: 1 / the rank of a question's first relevant passage when it is in the top 10, else 0 (RR@10), averaged
  over questions.
- Ties: a relevant passage ranks after every non-relevant passage of the same score (pessimistic), so a model that
  scores passages alike gets no credit from the order they happen to have in the corpus; tied relevant passages
  follow each other in corpus order (which of them comes first changes neither measure).

Ranks are counted, not sorted: only the relevant passages' ranks are needed, and counting is the same whatever
the order of the other passages.
"""
from typing import Dict, Sequence

import torch

MRR_CUTOFF = 10
MRR_NAME = f"mrr@{MRR_CUTOFF}"


def recall_name(k: int) -> str:
    return f"recall@{k}"


def relevant_ranks(scores: torch.Tensor, relevant: Sequence[Sequence[int]]) -> torch.Tensor:
    """[questions, most relevant passages] float64: the 1-based rank (the module's tie rule) of each question's
    relevant passages (`relevant[i]`: distinct column positions of `scores`, at least one), inf where a question
    has fewer."""
    questions, columns = scores.shape
    width = max((len(r) for r in relevant), default=0)
    positions = torch.full((questions, width), -1, dtype=torch.long)
    for row, passages in enumerate(relevant):
        positions[row, : len(passages)] = torch.as_tensor(list(passages), dtype=torch.long)
    positions = positions.to(scores.device)
    present = positions >= 0
    safe = positions.clamp(min=0)
    is_relevant = torch.zeros(scores.shape, dtype=torch.int32, device=scores.device)
    is_relevant = is_relevant.scatter_add_(1, safe, present.int()) > 0
    column = torch.arange(columns, device=scores.device)
    ranks = torch.full((questions, width), float("inf"), dtype=torch.float64, device=scores.device)
    for slot in range(width):
        score = scores.gather(1, safe[:, slot : slot + 1])
        tied = scores == score
        before = ((scores > score) | (tied & ~is_relevant)
                  | (tied & is_relevant & (column < safe[:, slot : slot + 1]))).sum(1)
        ranks[:, slot] = torch.where(present[:, slot], before.double() + 1, ranks[:, slot])
    return ranks


def metric_sums(ranks: torch.Tensor, relevant_counts: torch.Tensor, recall_at: Sequence[int]) -> Dict[str, float]:
    """The sums over questions of MRR@10 and of Recall@k for each k (divide by the number of questions for the
    means), from `relevant_ranks` and each question's number of relevant passages."""
    first = ranks.min(1).values
    sums = {MRR_NAME: float(torch.where(first <= MRR_CUTOFF, 1.0 / first, torch.zeros_like(first)).sum())}
    counts = relevant_counts.to(ranks.device, torch.float64)
    for k in recall_at:
        sums[recall_name(k)] = float(((ranks <= k).sum(1).double() / counts).sum())
    return sums
