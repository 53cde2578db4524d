"""Validation by retrieval (`train.val_retrieval=true`): rank a fixed corpus for every dev question and report
MRR@10 (the best checkpoint's measure) and Recall@k (dpr/evaluation/rank_metrics.py has the definitions and the
tie rule).

The corpus is a function of the dev data and `train.val_retrieval_seed` alone, built once: every (sampled) dev
question's positives and hard negatives, then `train.val_retrieval_other_passages` passages drawn from the rest of
the dev file's passages (any question's positives, negatives and hard negatives that are not already in). A passage
that appears more than once (the same passage by `same_passages`: id, or normalised text where one has no id) is
kept once, where it first appears. A question's relevant passages are the corpus passages that are the same passage
as one of its positives.

Every process encodes its own contiguous part of the questions and of the passages; the passage vectors are
gathered in corpus order, each process ranks the whole corpus for its questions, and the sums over questions are
added up across processes. Neither the number of processes nor the encoding batch changes which vector a passage
gets (beyond float noise), so neither changes the values.
"""
import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from omegaconf import DictConfig

from dpr.data.biencoder_data import BiEncoderSample
from dpr.data.passages import Passage
from dpr.evaluation.qa_validation import token_key
from dpr.evaluation.rank_metrics import metric_sums, relevant_ranks
from dpr.foundation.config_values import true_or_false
from dpr.training.false_negatives import same_passages

logger = logging.getLogger(__name__)

# Roles of the corpus seed's random streams
QUESTION_SAMPLE, OTHER_PASSAGES = 0, 1
# Scores ranked at once: rows of questions x corpus passages (64 MB of float32 scores)
SCORES_PER_CHUNK = 1 << 24


@dataclass(frozen=True)
class RetrievalValidationSettings:
    """`train.val_retrieval*`, resolved once; `RetrievalValidationSettings.from_config` gives None when off."""

    other_passages: int
    recall_at: Tuple[int, ...]  # ascending, distinct
    seed: int
    max_questions: Optional[int]  # None: every dev question

    @classmethod
    def from_config(cls, train: DictConfig) -> Optional["RetrievalValidationSettings"]:
        if not true_or_false("train.val_retrieval", train.get("val_retrieval", False)):
            return None
        max_questions = train.get("val_retrieval_max_qs")
        return cls(
            other_passages=int(train.val_retrieval_other_passages),
            recall_at=tuple(sorted({int(k) for k in train.val_retrieval_recall_at})),
            seed=int(train.val_retrieval_seed),
            max_questions=None if max_questions is None else int(max_questions),
        )


@dataclass(frozen=True)
class RetrievalCorpus:
    questions: List[str]
    passages: List[Passage]  # the questions' positives and hard negatives first, then the other passages drawn
    relevant: List[List[int]]  # per question: the positions in `passages` of its relevant passages, ascending
    judged: int  # passages[:judged] are the questions' positives and hard negatives
    others_available: int  # distinct passages the other passages were drawn from
    recall_at: Tuple[int, ...]  # the settings' k's that do not exceed the corpus

    def describe(self) -> str:
        return (f"{len(self.questions)} questions, {len(self.passages)} passages ({self.judged} positives and hard "
                f"negatives, {len(self.passages) - self.judged} others drawn from {self.others_available})")


def build_retrieval_corpus(samples: Sequence[BiEncoderSample],
                           settings: RetrievalValidationSettings) -> RetrievalCorpus:
    """The corpus of the module docstring; a pure function of `samples` (in file order) and `settings`."""
    chosen = list(range(len(samples)))
    if settings.max_questions is not None and settings.max_questions < len(samples):
        rng = np.random.default_rng([settings.seed, QUESTION_SAMPLE])
        chosen = sorted(int(i) for i in rng.choice(len(samples), settings.max_questions, replace=False))
    # Every passage occurrence of the dev file: the chosen questions' positives and hard negatives first, so that
    # they are the ones kept of each passage, then every passage of every question.
    occurrences: List[Passage] = []
    positive_occurrences: List[List[int]] = []
    for i in chosen:
        sample = samples[i]
        positive_occurrences.append(list(range(len(occurrences), len(occurrences) + len(sample.positive_passages))))
        occurrences += sample.positive_passages + sample.hard_negative_passages
    judged_occurrences = len(occurrences)
    for sample in samples:
        occurrences += sample.positive_passages + sample.negative_passages + sample.hard_negative_passages
    same = same_passages(occurrences, lru_cache(maxsize=None)(token_key))  # each text's key computed once

    kept: List[int] = []  # occurrences kept, in order: the first of each passage
    is_kept = np.zeros(len(occurrences), dtype=bool)
    for position in range(len(occurrences)):
        if not any(is_kept[other] for other in same(position) if other < position):
            is_kept[position] = True
            kept.append(position)
    judged = [p for p in kept if p < judged_occurrences]
    others = [p for p in kept if p >= judged_occurrences]
    drawn: List[int] = []
    if settings.other_passages and others:
        rng = np.random.default_rng([settings.seed, OTHER_PASSAGES])
        picks = rng.choice(len(others), min(settings.other_passages, len(others)), replace=False)
        drawn = [others[int(i)] for i in sorted(picks)]
    corpus_position = {occurrence: index for index, occurrence in enumerate(judged + drawn)}

    relevant = []
    for positives in positive_occurrences:
        # the corpus passages that are the same passage as one of the question's positives (the positive's own
        # occurrence may have been kept under an earlier one of the same passage)
        found = {corpus_position[other] for p in positives for other in same(p) if other in corpus_position}
        relevant.append(sorted(found))
    size = len(judged) + len(drawn)
    left_out = [k for k in settings.recall_at if k > size]
    if left_out:
        logger.warning("Retrieval validation: Recall at %s left out: deeper than the corpus of %d passages",
                       left_out, size)
    return RetrievalCorpus(
        questions=[samples[i].question for i in chosen],
        passages=[occurrences[p] for p in judged + drawn],
        relevant=relevant,
        judged=len(judged),
        others_available=len(others),
        recall_at=tuple(k for k in settings.recall_at if k <= size),
    )


def local_part(n: int, rank: int, world_size: int) -> np.ndarray:
    """This process's contiguous part of range(n) (the parts in rank order are range(n))."""
    return np.array_split(np.arange(n), world_size)[rank]


def ranking_sums(questions: torch.Tensor, passages: torch.Tensor, relevant: Sequence[Sequence[int]],
                 recall_at: Sequence[int], score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> List[float]:
    """[MRR@10 sum, Recall@k sums..., number of questions] of `questions` (vectors) ranking all `passages`
    (vectors) with `score`, a few rows of questions at a time."""
    totals = [0.0] * (1 + len(recall_at))
    rows = max(1, SCORES_PER_CHUNK // max(1, passages.shape[0]))
    for start in range(0, questions.shape[0], rows):
        chunk = relevant[start : start + rows]
        ranks = relevant_ranks(score(questions[start : start + rows], passages), chunk)
        counts = torch.tensor([len(r) for r in chunk])
        sums = metric_sums(ranks, counts, recall_at)
        totals = [t + s for t, s in zip(totals, sums.values())]
    return totals + [float(questions.shape[0])]
