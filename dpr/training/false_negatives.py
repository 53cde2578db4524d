"""In-batch false negatives: which contexts of a global batch leave which question's softmax
(`train.in_batch_negatives`).

DPR counts every context of the global batch as a negative of every question but its own positive (`all`). Where
questions share a gold passage, a copy of question i's gold passage (another question's positive or hard negative)
is among i's negatives, and the loss pushes i away from it. `mask_duplicates` takes out of i's softmax every context
that is the same passage as i's positive: the same passage id, or, where either of the two has no id, the same
normalised text (the uncased NFD tokens of DPR's has_answer). `mask_answers` also takes out every context whose
text contains one of i's answers, as DPR's has_answer (string match) finds them. Question i's own positive is never
taken out.

The mask is a function of the global batch alone (its examples' sampled contexts and answers, in batch order), so
every process computes the same one before the batch is split across processes and chunks, and the loss applies
it to the gathered global similarity matrix: chunking and world size change neither it nor the gradients. Each
text's token key is computed once and cached, not at every step.
"""
from collections import defaultdict
from functools import lru_cache
from typing import Callable, Dict, List, Optional, Sequence, Set

import torch

from dpr.data.biencoder_data import SampledContexts
from dpr.data.passages import Passage
from dpr.evaluation.qa_validation import token_key

IN_BATCH_NEGATIVES = ("all", "mask_duplicates", "mask_answers")
# Texts (passages and answers) whose token keys stay cached: every passage of squad_open, those of some hundreds of
# batches of NQ; at most about 100 MB for DPR's 100-word passages.
KEY_CACHE_SIZE = 1 << 17


def same_passages(passages: Sequence[Passage], key: Callable[[str], str] = token_key) -> Callable[[int], List[int]]:
    """The passage identity: a function of a passage's position giving the positions of the passages that are the
    same passage (itself included). Ids decide where both passages have one, the normalised text (`key`, the
    uncased NFD tokens of has_answer) where either has none. Symmetric: q is among p's exactly when p is among q's."""
    by_id: Dict[str, List[int]] = defaultdict(list)
    no_id_by_text: Dict[str, List[int]] = defaultdict(list)
    for position, passage in enumerate(passages):
        if passage.id is None:
            no_id_by_text[key(passage.text)].append(position)
        else:
            by_id[passage.id].append(position)
    all_by_text: Dict[str, List[int]] = defaultdict(list)
    if no_id_by_text:  # texts are compared only when some passage has no id
        for position, passage in enumerate(passages):
            all_by_text[key(passage.text)].append(position)

    def same(position: int) -> List[int]:
        passage = passages[position]
        if passage.id is None:
            return all_by_text[key(passage.text)]
        return by_id[passage.id] + (no_id_by_text.get(key(passage.text), []) if no_id_by_text else [])

    return same


class FalseNegativeMask:
    """`mask(examples, answers)`: the [questions, contexts] bool mask of a global batch for `mode`."""

    def __init__(self, mode: str, cache_size: int = KEY_CACHE_SIZE):
        if mode not in IN_BATCH_NEGATIVES:
            raise ValueError(f"unknown in-batch negatives mode {mode!r}; expected one of {IN_BATCH_NEGATIVES}")
        self.mode = mode
        self._key = lru_cache(maxsize=cache_size)(token_key)

    def __call__(self, examples: Sequence[SampledContexts],
                 answers: Sequence[Sequence[str]]) -> Optional[torch.Tensor]:
        """The mask of the global batch whose examples are `examples` (in batch order: its contexts are theirs,
        concatenated) with the answers of each question; True takes that context out of that question's softmax.
        None for `all`, DPR's."""
        if self.mode == "all":
            return None
        contexts = [context for example in examples for context in example.contexts]
        positives, offset = [], 0
        for example in examples:
            positives.append(offset + example.positive_index)
            offset += len(example.contexts)
        pairs = []  # (question, context) positions to mask, set in one indexing operation
        same = same_passages(contexts, self._key)
        for question, positive in enumerate(positives):
            pairs += [(question, position) for position in same(positive)]
        if self.mode == "mask_answers":
            answer_keys = [[self._key(answer) for answer in question_answers] for question_answers in answers]
            containing = self._answer_finder(contexts, {key for keys in answer_keys for key in keys})
            for question, keys in enumerate(answer_keys):
                for key in keys:
                    pairs += [(question, position) for position in containing(key)]
        masked = torch.zeros(len(examples), len(contexts), dtype=torch.bool)
        if pairs:
            masked[tuple(torch.tensor(pairs, dtype=torch.long).T)] = True
        masked[torch.arange(len(positives)), torch.tensor(positives, dtype=torch.long)] = False
        return masked

    def _answer_finder(self, contexts: List[Passage], answer_keys: Set[str]):
        """A function of an answer's token key (one of `answer_keys`): the positions of the contexts whose text
        holds that token sequence (has_answer's string match), looked for only in the contexts that hold each of
        its tokens."""
        keys = [self._key(context.text) for context in contexts]
        answer_tokens = {token for key in answer_keys for token in key.split()}
        holding: Dict[str, Set[int]] = defaultdict(set)  # answer token -> positions of the contexts that hold it
        for position, key in enumerate(keys):
            for token in answer_tokens.intersection(key.split()):
                holding[token].add(position)

        def containing(answer_key: str) -> List[int]:
            tokens = answer_key.split()
            if not tokens:  # an answer without tokens never matches (has_answer)
                return []
            candidates = set.intersection(*(holding.get(token, set()) for token in tokens))
            return sorted(position for position in candidates if answer_key in keys[position])

        return containing
