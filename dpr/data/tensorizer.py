"""Text to token ids as the released DPR checkpoints were trained: `[CLS] title [SEP] text [SEP]`.

Sequences are truncated to `max_length` (longest-first for title/text pairs, as DPR's tokenizer call does),
token type ids are all zero (also for title pairs) and the attention mask is `ids != pad`. Padding is either to
`max_length` (DPR's fixed padding) or to the longest sequence of the batch (dynamic padding, cheaper; BERT
masks padded positions out, so the vectors are the same: tests/test_biencoder_data.py proves it).
DPR's trailing-[SEP]-on-every-padded-row quirk (DPR #210) is not reproduced: truncated rows end in [SEP] anyway.
"""
from typing import List, Optional, Sequence, Tuple

import torch
from transformers import PreTrainedTokenizerBase

from dpr.models.encoder_spec import EncoderSpec
from dpr.models.hf_encoder import load_tokenizer


class Tensorizer:
    """`prefix` goes before the first segment of every input (the title when there is one), before tokenization.
    `questions` is the tensorizer of a bi-encoder's questions (their own length and prefix); itself by default."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int, pad_to_max: bool = False,
                 prefix: str = "", questions: Optional["Tensorizer"] = None):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_to_max = pad_to_max
        self.pad_id = tokenizer.pad_token_id
        self.prefix = prefix
        self.questions = questions if questions is not None else self

    @classmethod
    def for_spec(cls, spec: EncoderSpec, tokenizer: Optional[PreTrainedTokenizerBase] = None) -> "Tensorizer":
        """The tensorizer of an encoder spec: its sequence length and padding, and its model's tokenizer (loaded
        with the spec's lower-casing unless given)."""
        if tokenizer is None:
            tokenizer = load_tokenizer(spec.pretrained_model_cfg, spec.do_lower_case)
        return cls(tokenizer, spec.sequence_length, spec.pad_to_max)

    @classmethod
    def for_biencoder(cls, spec: EncoderSpec, tokenizer: Optional[PreTrainedTokenizerBase] = None) -> "Tensorizer":
        """The tensorizer of a bi-encoder's passages (sequence_length, passage_prefix), with its `questions`
        (query_sequence_length, query_prefix)."""
        passages = cls.for_spec(spec, tokenizer)
        passages.prefix = spec.passage_prefix
        passages.questions = cls(passages.tokenizer, spec.question_length, spec.pad_to_max, spec.query_prefix)
        return passages

    def token_ids(
        self, texts: Sequence[str], titles: Optional[Sequence[Optional[str]]] = None, add_special_tokens: bool = True
    ) -> List[List[int]]:
        """Token ids of each text (with its title first when the title is non-empty), in one batched call per
        kind so that fast tokenizers work on whole lists."""
        texts = [t.strip() for t in texts]
        titles = list(titles) if titles is not None else [None] * len(texts)
        if self.prefix:
            titles = [self.prefix + title if title else title for title in titles]
            texts = [text if title else self.prefix + text for text, title in zip(texts, titles)]
        out: List[Optional[List[int]]] = [None] * len(texts)
        with_title = [i for i, title in enumerate(titles) if title]
        without_title = [i for i, title in enumerate(titles) if not title]
        common = dict(add_special_tokens=add_special_tokens, truncation=True, max_length=self.max_length)
        if with_title:
            encoded = self.tokenizer(
                [titles[i] for i in with_title], [texts[i] for i in with_title], **common
            )["input_ids"]
            for i, ids in zip(with_title, encoded):
                out[i] = ids
        if without_title:
            encoded = self.tokenizer([texts[i] for i in without_title], **common)["input_ids"]
            for i, ids in zip(without_title, encoded):
                out[i] = ids
        return out

    def pad(self, sequences: Sequence[Sequence[int]]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(ids [B, T], attention mask [B, T]); T = max_length, or the longest row with dynamic padding."""
        longest = max((len(s) for s in sequences), default=0)
        width = self.max_length if self.pad_to_max else max(longest, 1)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        for row, seq in enumerate(sequences):
            seq = list(seq)[:width]
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        return ids, self.attention_mask(ids)

    def attention_mask(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids != self.pad_id).long()

    def tensorize(
        self, texts: Sequence[str], titles: Optional[Sequence[Optional[str]]] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.pad(self.token_ids(texts, titles))
