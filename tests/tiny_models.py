"""Tiny BERT models built offline, saved as ordinary model directories so the real loading code runs."""
import string
from pathlib import Path

from transformers import BertConfig, BertModel, BertTokenizerFast

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["the", "who", "what", "is", "of", "in", "and", "a", "was", "to"]


def write_vocab(folder: Path) -> Path:
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = SPECIAL + WORDS + chars + ["##" + c for c in string.ascii_lowercase + string.digits]
    path = folder / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n")
    return path


def tiny_bert_dir(folder: Path, dropout: float = 0.1, seed: int = 0, hidden: int = 32, layers: int = 2,
                  max_positions: int = 128) -> str:
    """A randomly initialised BERT (hidden 32, 2 layers) with a character-level WordPiece vocabulary."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizerFast(vocab=str(write_vocab(folder)), do_lower_case=True)
    config = BertConfig(
        # the highest id + 1: "a" is both a word and a character, so the ids outnumber the distinct tokens
        vocab_size=max(tokenizer.get_vocab().values()) + 1,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=max_positions,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
