"""DPR retriever training data: reading the JSON files and sampling each question's contexts.

Sampling (which positive, which negatives) is a pure function of (seed, epoch, example index), so a run sees
the same data whatever its batch composition, chunking or number of processes.
"""
import json
import logging
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np

from dpr.data.data_files import DataFileError, open_text, without_gz
from dpr.data.passages import Passage
from dpr.data.resources import resolve_data_path

logger = logging.getLogger(__name__)


@dataclass
class BiEncoderSample:
    question: str
    answers: List[str]
    positive_passages: List[Passage]
    negative_passages: List[Passage] = field(default_factory=list)
    hard_negative_passages: List[Passage] = field(default_factory=list)


def normalize_question(question: str) -> str:
    """DPR's normalisation, the same for training and retrieval: curly apostrophes become straight ones."""
    return question.replace("\u2019", "'")


def iter_json_records(path: str) -> Iterable[Tuple[str, object]]:
    """(location, record) pairs of a JSON list file or a JSON-lines file, plain or gzipped. Location names the
    record or line for error messages."""
    with open_text(path) as f:
        if without_gz(path).endswith(".jsonl"):
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield f"line {line_no}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataFileError(f"{path}: line {line_no} is not valid JSON: {e.msg}") from e
            return
        try:
            records = json.load(f)
        except json.JSONDecodeError as e:
            raise DataFileError(f"{path}: not valid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    if not isinstance(records, list):
        raise DataFileError(f"{path}: expected a JSON list of samples, found {type(records).__name__}")
    for index, record in enumerate(records):
        yield f"record {index}", record


def _passages(raw: object, where: str) -> List[Passage]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise DataFileError(f"{where}: expected a list of passages, found {type(raw).__name__}")
    passages = []
    for ctx in raw:
        if not isinstance(ctx, dict) or not isinstance(ctx.get("text"), str):
            raise DataFileError(f"{where}: a passage without a 'text' string: {str(ctx)[:80]}")
        passage_id = ctx.get("passage_id")
        passages.append(Passage(None if passage_id is None else str(passage_id), ctx["text"], ctx.get("title")))
    return passages


def load_biencoder_samples(patterns: Sequence[str]) -> List[BiEncoderSample]:
    """Samples of DPR retriever JSON files (.json, .jsonl, gzipped or not; paths, globs or resource keys). Records
    without a question or without positive passages are skipped and counted in one warning line, as DPR drops
    them."""
    samples: List[BiEncoderSample] = []
    for path in [path for pattern in patterns for path in resolve_data_path(pattern)]:
        skipped = 0
        for location, record in iter_json_records(path):
            where = f"{path}: {location}"
            if not isinstance(record, dict):
                raise DataFileError(f"{where}: expected a JSON object, found {type(record).__name__}")
            question = record.get("question")
            positives = _passages(record.get("positive_ctxs"), where)
            if not isinstance(question, str) or not question.strip() or not positives:
                skipped += 1
                continue
            samples.append(
                BiEncoderSample(
                    question=normalize_question(question),
                    answers=list(record.get("answers") or []),
                    positive_passages=positives,
                    negative_passages=_passages(record.get("negative_ctxs"), where),
                    hard_negative_passages=_passages(record.get("hard_negative_ctxs"), where),
                )
            )
        if skipped:
            logger.warning("%s: skipped %d records without a question or without positive_ctxs", path, skipped)
        logger.info("Loaded %s", path)
    logger.info("Total cleaned data size: %d", len(samples))
    return samples


def example_seed(seed: int, epoch: int, index: int, role: int = 0) -> int:
    """A 63-bit seed for one example's randomness (sampling, dropout); `role` tells apart its uses."""
    state = np.random.SeedSequence([seed, epoch, index, role]).generate_state(2, np.uint32)
    return ((int(state[0]) << 32) | int(state[1])) & ((1 << 63) - 1)


@dataclass
class SampledContexts:
    """A question's contexts in DPR's order: [positive] + other negatives + hard negatives."""

    question: str
    contexts: List[Passage]
    positive_index: int
    hard_negative_indices: List[int]


def sample_contexts(
    sample: BiEncoderSample,
    hard_negatives: int,
    other_negatives: int,
    shuffle: bool,
    rng: Optional[np.random.Generator] = None,
    shuffle_positives: bool = False,
    hard_neg_fallback: bool = True,
) -> SampledContexts:
    """DPR's per-question sampling. With shuffle (training) the negatives are permuted by `rng` before the first
    `other_negatives` / `hard_negatives` are taken; without hard negatives DPR falls back to the first random
    negatives. The hard negative indices are computed correctly also when other negatives come first (DPR #92)."""
    positives = sample.positive_passages
    if shuffle and shuffle_positives:
        positive = positives[int(rng.integers(len(positives)))]
    else:
        positive = positives[0]
    negatives = list(sample.negative_passages)
    hard = list(sample.hard_negative_passages)
    if shuffle:
        negatives = [negatives[i] for i in rng.permutation(len(negatives))]
        hard = [hard[i] for i in rng.permutation(len(hard))]
    if hard_neg_fallback and not hard:
        hard = negatives[:hard_negatives]
    others = negatives[:other_negatives]
    hard = hard[:hard_negatives]
    start_hard = 1 + len(others)
    return SampledContexts(
        question=sample.question,
        contexts=[positive] + others + hard,
        positive_index=0,
        hard_negative_indices=list(range(start_hard, start_hard + len(hard))),
    )
