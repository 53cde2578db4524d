"""Tensors of one process's part of a bi-encoder batch."""
from dataclasses import dataclass, replace
from typing import List, Optional, Sequence

import numpy as np
import torch

from dpr.data.biencoder_data import BiEncoderSample, SampledContexts, example_seed, sample_contexts
from dpr.data.tensorizer import Tensorizer

# Roles of an example's random streams (see example_seed); context slot k uses CONTEXT_DROPOUT + k.
SAMPLING, QUESTION_DROPOUT, CONTEXT_DROPOUT = 0, 1, 2


@dataclass
class BiEncoderBatch:
    question_ids: torch.Tensor  # [Nq, T]
    question_mask: torch.Tensor
    context_ids: torch.Tensor  # [Nc, T]
    context_mask: torch.Tensor
    positive_indices: torch.Tensor  # [Nq] index of each question's positive among this batch's contexts
    hard_negative_indices: List[List[int]]
    question_seeds: Optional[List[int]] = None  # per-row dropout seeds (training only)
    context_seeds: Optional[List[int]] = None
    dataset_index: int = 0

    def to(self, device: torch.device) -> "BiEncoderBatch":
        return replace(
            self,
            question_ids=self.question_ids.to(device),
            question_mask=self.question_mask.to(device),
            context_ids=self.context_ids.to(device),
            context_mask=self.context_mask.to(device),
            positive_indices=self.positive_indices.to(device),
        )


def sample_examples(
    samples: Sequence[BiEncoderSample],
    indices: Sequence[int],
    hard_negatives: int,
    other_negatives: int,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    shuffle_positives: bool = False,
) -> List[SampledContexts]:
    """The contexts of the examples `indices`, in batch order; with shuffle (training) each example's sampling
    comes from (seed, epoch, index) alone, so any process can sample any part of a global batch."""
    sampled = []
    for index in indices:
        index = int(index)
        rng = np.random.default_rng(example_seed(seed, epoch, index, SAMPLING)) if shuffle else None
        sampled.append(sample_contexts(
            samples[index], hard_negatives, other_negatives, shuffle, rng, shuffle_positives=shuffle_positives
        ))
    return sampled


def make_biencoder_batch(
    samples: Sequence[BiEncoderSample],
    indices: Sequence[int],
    tensorizer: Tensorizer,
    hard_negatives: int,
    other_negatives: int,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    shuffle_positives: bool = False,
    dataset_index: int = 0,
) -> BiEncoderBatch:
    """Tensorize the examples `indices` of `samples`. With shuffle (training) each example's sampling and its
    dropout seeds come from (seed, epoch, index) alone."""
    questions, contexts, positives, hard_negs = [], [], [], []
    q_seeds: List[int] = []
    c_seeds: List[int] = []
    examples = sample_examples(samples, indices, hard_negatives, other_negatives, shuffle, seed, epoch,
                               shuffle_positives)
    for index, sampled in zip(indices, examples):
        index = int(index)
        offset = len(contexts)
        questions.append(sampled.question)
        contexts.extend(sampled.contexts)
        positives.append(offset + sampled.positive_index)
        hard_negs.append([offset + i for i in sampled.hard_negative_indices])
        if shuffle:
            q_seeds.append(example_seed(seed, epoch, index, QUESTION_DROPOUT))
            c_seeds.extend(
                example_seed(seed, epoch, index, CONTEXT_DROPOUT + slot) for slot in range(len(sampled.contexts))
            )
    q_ids, q_mask = tensorizer.questions.tensorize(questions)
    c_ids, c_mask = tensorizer.tensorize([c.text for c in contexts], [c.title for c in contexts])
    return BiEncoderBatch(
        question_ids=q_ids,
        question_mask=q_mask,
        context_ids=c_ids,
        context_mask=c_mask,
        positive_indices=torch.tensor(positives, dtype=torch.long),
        hard_negative_indices=hard_negs,
        question_seeds=q_seeds if shuffle else None,
        context_seeds=c_seeds if shuffle else None,
        dataset_index=dataset_index,
    )
