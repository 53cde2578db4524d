"""A small passage collection, question file and bi-encoder checkpoint for the embedding and retrieval tests."""
import csv
from pathlib import Path
from typing import List, Optional

import torch

from tests.fixtures import TOPICS
from tests.tiny_models import tiny_bert_dir
from tests.training_helpers import compose_config

SEQUENCE_LENGTH = 64
DISTRACTORS = [
    ("river", "the river runs to the sea and the sea is blue"),
    ("hill", "a hill is a small mountain in the country"),
    ("winter", "in winter the days are short and the nights are long"),
    ("bread", "bread is made of flour water and yeast"),
    ("music", "music is played in the hall of the city"),
    ("chess", "chess is a game of two players on a board"),
    ("moon", "the moon goes round the earth in a month"),
    ("rain", "rain falls from clouds when the air is cold"),
    ("garden", "a garden has flowers trees and grass"),
    ("train", "the train leaves the station at nine"),
    ("book", "a book has pages and a cover"),
]


def passages() -> List[tuple]:
    """(id, text, title): 12 capital passages and 11 distractors (23: an awkward count for any shard number)."""
    rows = [(city, text) for city, _country, text in TOPICS] + DISTRACTORS
    return [(str(i + 1), text, title) for i, (title, text) in enumerate(rows)]


def write_passages_tsv(path: Path, rows=None) -> str:
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file, delimiter="\t", lineterminator="\n")
        writer.writerow(["id", "text", "title"])
        writer.writerows(rows if rows is not None else passages())
    return str(path)


def write_questions_csv(path: Path) -> str:
    lines = [f"what is the capital of {country}?\t['{city}']" for city, country, _text in TOPICS]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def tiny_model(folder: Path, seed: int = 0) -> str:
    return tiny_bert_dir(folder, dropout=0.0, seed=seed)


def write_biencoder_checkpoint(path: Path, question_model_dir: str, ctx_model_dir: str, **spec_fields) -> str:
    """A DPR-format checkpoint whose question and ctx halves are two different tiny models, its encoder_params
    written as the trainer writes them (`EncoderSpec.checkpoint_params`, with `spec_fields` set)."""
    from transformers import BertModel

    from dpr.foundation.checkpoints import CheckpointState, save_checkpoint
    from dpr.models.encoder_spec import EncoderSpec

    state = {}
    for prefix, model_dir in (("question_model.", question_model_dir), ("ctx_model.", ctx_model_dir)):
        weights = BertModel.from_pretrained(model_dir).state_dict()
        state.update({prefix + key: value for key, value in weights.items()})
    spec = EncoderSpec(ctx_model_dir, sequence_length=SEQUENCE_LENGTH, **spec_fields)
    save_checkpoint(str(path), CheckpointState(state, None, None, 0, 0, spec.checkpoint_params()))
    return str(path)


def gen_embs_config(model_dir: str, ctx_src: str, out_file: str, **values):
    overrides = {
        "encoder.pretrained_model_cfg": model_dir,
        "encoder.sequence_length": SEQUENCE_LENGTH,
        "ctx_src": ctx_src,
        "out_file": out_file,
        "batch_size": 4,
        "tokenize_chunk": 8,
        "num_workers": 0,
    }
    overrides.update({key.replace("__", "."): value for key, value in values.items()})
    return compose_config([f"{key}={value}" for key, value in overrides.items()], "gen_embs")


def retriever_config(model_dir: str, qa_file: str, ctx_file: str, embeddings: str, out_file: str, **values):
    overrides = {
        "encoder.pretrained_model_cfg": model_dir,
        "encoder.sequence_length": SEQUENCE_LENGTH,
        "qa_dataset": qa_file,
        "ctx_datatsets": f"[{ctx_file}]",
        "encoded_ctx_files": f"['{embeddings}']",
        "out_file": out_file,
        "n_docs": 20,
        "validation_workers": 1,
        "batch_size": 5,
    }
    overrides.update({key.replace("__", "."): value for key, value in values.items()})
    return compose_config([f"{key}={value}" for key, value in overrides.items()], "dense_retriever")


def encode_directly(model_dir: str, texts: List[str], titles: Optional[List[str]] = None,
                    pooling: str = "cls") -> torch.Tensor:
    """Vectors of title/text pairs (or texts alone), fixed padding, one batch, straight from transformers: the
    [CLS] vector, or the mean of the non-padding token vectors. The reference the pipeline must equal."""
    from transformers import AutoTokenizer, BertModel

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = BertModel.from_pretrained(model_dir).eval()
    pairs = (titles, texts) if titles is not None else (texts,)
    encoded = tokenizer(*pairs, truncation=True, max_length=SEQUENCE_LENGTH, padding="max_length",
                        return_tensors="pt")
    with torch.no_grad():
        hidden = model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).last_hidden_state
    if pooling == "cls":
        return hidden[:, 0, :]
    mask = encoded["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1)


def embedded_tiny_collection(folder: Path) -> dict:
    """A tiny model, 23 passages embedded in 2 shards (by generate_dense_embeddings), 12 questions."""
    from dpr.indexing.generate_embeddings import generate_dense_embeddings

    model = tiny_model(folder / "bert")
    psgs = write_passages_tsv(folder / "psgs.tsv")
    for shard_id in range(2):
        generate_dense_embeddings(gen_embs_config(model, psgs, folder / "embs" / "psgs", shard_id=shard_id,
                                                  num_shards=2))
    return {"model": model, "psgs": psgs, "qas": write_questions_csv(folder / "qas.csv"),
            "embs": str(folder / "embs" / "psgs_*"), "dir": folder}
