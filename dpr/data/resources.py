"""Downloadable resources (DPR's RESOURCES_MAP superset, spec §7), and the one resolution of what a data option
names: a config-group entry, a path, a glob or a resource key, to local files.

A key such as ``data.retriever.nq-dev`` names remote file(s) under a base URL; locally it lives in DPR's layout
``{data_dir}/downloads/{key parts[:-1] as folders}/{last part}{ext}`` (list-valued resources as ``{last}_{i}{ext}``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from dpr.data.data_files import expand_glob
from dpr.foundation.errors import UserInputError

DPR_BASE_URL = "https://dl.fbaipublicfiles.com/dpr/"
SQUAD_BASE_URL = "https://rajpurkar.github.io/"
# Fetched next to every NQ-derived resource (Natural Questions is CC BY-SA 3.0).
NQ_LICENSE_FILES = ("nq_license/LICENSE", "nq_license/README")
DOWNLOADS_DIR = "downloads"
DATA_DIR_ENV = "DPR_DATA_DIR"


class DataPathError(UserInputError, FileNotFoundError):
    """A data option names no file: not an existing path, a glob matching files, a downloaded resource key or an
    entry of its config group."""


@dataclass(frozen=True)
class Resource:
    """Remote file(s) of one key; ``remote_paths`` are relative to ``base_url`` (and to a mirror's root).
    ``size``: the published size in bytes of a single-file resource as fetched, checked after the download."""

    remote_paths: tuple[str, ...]
    ext: str
    compressed: bool
    nq_license: bool
    description: str
    is_list: bool = False
    base_url: str = DPR_BASE_URL
    size: int | None = None

    def urls(self, mirror: str | None = None) -> list[str]:
        base = mirror if mirror else self.base_url
        return [join_url(base, path) for path in self.remote_paths]


def join_url(base: str, relative_path: str) -> str:
    return base.rstrip("/") + "/" + relative_path.lstrip("/")


def _single(path: str, ext: str, description: str, gz: bool = False, nq: bool = False,
            size: int | None = None) -> Resource:
    return Resource((path,), ext, gz, nq, description, size=size)


def _listed(paths: list[str], ext: str, description: str, nq: bool = False) -> Resource:
    return Resource(tuple(paths), ext, False, nq, description, is_list=True)


def _retriever_data() -> dict[str, Resource]:
    resources = {
        "data.wikipedia_split.psgs_w100": _single(
            "wikipedia_split/psgs_w100.tsv.gz", ".tsv",
            "Wikipedia (Dec 2018) split into 21,015,324 passages of 100 words", gz=True),
        "data.retriever.nq-adv-hn-train": _single(
            "data/retriever/biencoder-nq-adv-hn-train.json.gz", ".json",
            "NQ train with hard negatives mined by the DPR model itself", gz=True, nq=True),
    }
    for split in ("dev", "train"):
        resources[f"data.retriever.nq-{split}"] = _single(
            f"data/retriever/biencoder-nq-{split}.json.gz", ".json",
            f"NQ {split} subset with passage pools for the retriever", gz=True, nq=True)
    for key_name, file_name, label in (
        ("trivia", "trivia", "TriviaQA"),
        ("squad1", "squad1", "SQuAD v1.1"),
        ("webq", "webquestions", "WebQuestions"),
        ("curatedtrec", "curatedtrec", "CuratedTREC"),
    ):
        for split in ("train", "dev"):
            resources[f"data.retriever.{key_name}-{split}"] = _single(
                f"data/retriever/biencoder-{file_name}-{split}.json.gz", ".json",
                f"{label} {split} subset with passage pools for the retriever", gz=True)
    return resources


def _qas_data() -> dict[str, Resource]:
    resources: dict[str, Resource] = {}
    for split in ("dev", "test", "train"):
        resources[f"data.retriever.qas.nq-{split}"] = _single(
            f"data/retriever/nq-{split}.qa.csv", ".csv", f"NQ {split} questions and answers", nq=True)
        resources[f"data.retriever.qas.trivia-{split}"] = _single(
            f"data/retriever/trivia-{split}.qa.csv.gz", ".csv", f"TriviaQA {split} questions and answers", gz=True)
    for key_name, file_name, label in (
        ("squad1", "squad1", "SQuAD v1.1"),
        ("webq", "webquestions", "WebQuestions"),
        ("curatedtrec", "curatedtrec", "CuratedTREC (answers are regexes)"),
    ):
        resources[f"data.retriever.qas.{key_name}-test"] = _single(
            f"data/retriever/{file_name}-test.qa.csv", ".csv", f"{label} test questions and answers")
    return resources


def _gold_info_and_pretrained() -> dict[str, Resource]:
    resources = {
        f"data.gold_passages_info.nq_{split}": _single(
            f"data/nq_gold_info/nq-{split}_gold_info.json.gz", ".json",
            f"Original NQ gold passages and question tokens ({split} subset)", gz=True, nq=True)
        for split in ("train", "dev", "test")
    }
    resources["pretrained.fairseq.roberta-base.dict"] = _single(
        "pretrained/fairseq/roberta/dict.txt", ".txt", "Dictionary of the fairseq RoBERTa-base model")
    resources["pretrained.fairseq.roberta-base.model"] = _single(
        "pretrained/fairseq/roberta/model.pt", ".pt", "Weights of the fairseq RoBERTa-base model")
    resources["pretrained.pytext.bert-base.model"] = _single(
        "pretrained/pytext/bert/bert-base-uncased.pt", ".pt", "Weights of the PyText BERT-base-uncased model")
    return resources


def _retriever_results() -> dict[str, Resource]:
    resources = {}
    for model, label in (("single", "NQ-trained"), ("single-adv-hn", "NQ adversarial-hard-negative trained")):
        resources[f"data.retriever_results.nq.{model}.wikipedia_passages"] = _listed(
            [f"data/wiki_encoded/{model}/nq/wiki_passages_{i}" for i in range(50)], ".pkl",
            f"Wikipedia passage embeddings of the {label} retriever (50 shards, about 65 GB)")
    for split in ("test", "dev", "train"):
        resources[f"data.retriever_results.nq.single.{split}"] = _single(
            f"data/retriever_results/single/nq-{split}.json.gz", ".json",
            f"Retrieval results of the NQ-trained retriever on NQ {split}", gz=True, nq=True)
    resources["data.retriever_results.nq.single-adv-hn.test"] = _single(
        "data/retriever_results/single-adv-hn/nq-test.json.gz", ".json",
        "Retrieval results of the adversarial-hard-negative NQ retriever on NQ test", gz=True, nq=True)
    return resources


def _retriever_checkpoints() -> dict[str, Resource]:
    # "retriver" is a typo in the real URLs of the multiset and adv-hn checkpoints.
    return {
        "checkpoint.retriever.single.nq.bert-base-encoder": _single(
            "checkpoint/retriever/single/nq/hf_bert_base.cp", ".cp",
            "Biencoder checkpoint (BERT-base) trained on NQ"),
        "checkpoint.retriever.multiset.bert-base-encoder": _single(
            "checkpoint/retriver/multiset/hf_bert_base.cp", ".cp",
            "Biencoder checkpoint (BERT-base) trained on NQ, TriviaQA, WQ and TREC"),
        "checkpoint.retriever.single-adv-hn.nq.bert-base-encoder": _single(
            "checkpoint/retriver/single-adv-hn/nq/hf_bert_base.cp", ".cp",
            "Biencoder checkpoint (BERT-base) trained on NQ with adversarial hard negatives"),
    }


def _reader_data() -> dict[str, Resource]:
    resources = {}
    for dataset, nq, label in (("nq/single", True, "NQ, single-retriever"),
                               ("trivia/multi-hybrid", False, "TriviaQA, multiset hybrid-retriever")):
        key_prefix = "data.reader." + dataset.replace("/", ".")
        resources[f"{key_prefix}.train"] = _listed(
            [f"data/reader/{dataset}/train.{i}.pkl" for i in range(8)], ".pkl",
            f"Reader train data, preprocessed ({label}; 8 files)", nq=nq)
        for split in ("dev", "test"):
            resources[f"{key_prefix}.{split}"] = _listed(
                [f"data/reader/{dataset}/{split}.0.pkl"], ".pkl", f"Reader {split} data, preprocessed ({label})", nq=nq)
    return resources


def _reader_checkpoints_and_indexes() -> dict[str, Resource]:
    resources = {
        "checkpoint.reader.nq-single.hf-bert-base": _single(
            "checkpoint/reader/nq-single/hf_bert_base.cp", ".cp",
            "Reader checkpoint (BERT-base) trained on NQ single-retriever results",
            size=1_313_930_953),  # as reported in DPR #45
        "checkpoint.reader.nq-trivia-hybrid.hf-bert-base": _single(
            "checkpoint/reader/nq-trivia-hybrid/hf_bert_base.cp", ".cp",
            "Reader checkpoint (BERT-base) trained on NQ and TriviaQA hybrid-retriever results"),
    }
    for key_name, folder, label in (("nq-single-subset", "nq-single-seen_only", "DPR, seen-only passage subset"),
                                    ("nq-tfidf", "nq-drqa", "TF-IDF (DrQA) retriever"),
                                    ("nq-tfidf-subset", "nq-drqa-seen_only", "TF-IDF, seen-only passage subset")):
        resources[f"checkpoint.reader.{key_name}.hf-bert-base"] = _single(
            f"checkpoint/reader/{folder}/hf_bert_base.cp", ".cp", f"EfficientQA reader checkpoint ({label})")
    for key_name, file_name in (("full", "full"), ("subset", "seen_only")):
        for part, label in (("index", "FAISS index"), ("index_meta", "index passage ids")):
            resources[f"indexes.single.nq.{key_name}.{part}"] = _single(
                f"checkpoint/indexes/single/nq/{file_name}.{part}.dpr", ".dpr",
                f"EfficientQA {label} of the NQ retriever ({key_name} collection)")
        resources[f"indexes.tfidf.nq.{key_name}"] = _single(
            f"checkpoint/indexes/drqa/nq/{file_name}-tfidf.npz", ".npz",
            f"EfficientQA TF-IDF (DrQA) index ({key_name} collection)")
    return resources


def _extra_resources() -> dict[str, Resource]:
    """Resources beyond DPR's map: GC's compressed passages and the official SQuAD v1.1 files."""
    resources = {
        "compressed-data.wikipedia_split.psgs_w100": _single(
            "wikipedia_split/psgs_w100.tsv.gz", ".tsv.gz",
            "Wikipedia passages kept gzipped (GC-DPR reads the .tsv.gz directly)"),
    }
    for split in ("train", "dev"):
        resources[f"data.squad1.{split}"] = Resource(
            (f"SQuAD-explorer/dataset/{split}-v1.1.json",), ".json", False, False,
            f"Official SQuAD v1.1 {split} set (input of squad_to_dpr.py)", base_url=SQUAD_BASE_URL)
    return resources


def _build_resources_map() -> dict[str, Resource]:
    resources: dict[str, Resource] = {}
    for group in (_retriever_data, _qas_data, _gold_info_and_pretrained, _retriever_results,
                  _retriever_checkpoints, _reader_data, _reader_checkpoints_and_indexes, _extra_resources):
        resources.update(group())
    return resources


RESOURCES_MAP: dict[str, Resource] = _build_resources_map()


def matching_keys(name: str) -> list[str]:
    """An exact key, else every key that starts with ``name`` (DPR's raw-prefix matching); [] when none."""
    if name in RESOURCES_MAP:
        return [name]
    return [key for key in RESOURCES_MAP if key.startswith(name)]


def resource_dir(key: str, root_dir: str | os.PathLike) -> Path:
    """The folder of a key's local file(s): ``{root_dir}/downloads/{key parts[:-1]}``."""
    return Path(root_dir, DOWNLOADS_DIR, *key.split(".")[:-1])


def local_paths(key: str, root_dir: str | os.PathLike) -> list[Path]:
    """Local file(s) of a key in DPR's layout."""
    resource = RESOURCES_MAP[key]
    folder, last = resource_dir(key, root_dir), key.split(".")[-1]
    if resource.is_list:
        return [folder / f"{last}_{i}{resource.ext}" for i in range(len(resource.remote_paths))]
    return [folder / f"{last}{resource.ext}"]


def default_data_dir() -> str:
    return os.environ.get(DATA_DIR_ENV) or os.getcwd()


def resolve_data_path(name_or_path: str, data_dir: str | None = None) -> list[str]:
    """Local file(s) for a file path, a glob or a resource key.

    A path or glob that matches files is returned expanded, in natural order (``x_2`` before ``x_10``). A resource
    key resolves to its file(s) under ``data_dir`` (default ``$DPR_DATA_DIR`` or the current directory); a missing
    one raises DataPathError naming the download command.
    """
    matches = expand_glob(name_or_path)
    if matches:
        return matches
    if name_or_path not in RESOURCES_MAP:
        raise DataPathError(f"{name_or_path!r} is neither an existing file, a glob matching files, "
                            f"nor a resource key (list them with: python data/download_data.py)")
    root = data_dir or default_data_dir()
    paths = local_paths(name_or_path, root)
    missing = [str(path) for path in paths if not path.exists()]
    if missing:
        raise DataPathError(
            f"resource {name_or_path} is not downloaded ({len(missing)} of {len(paths)} file(s) missing, "
            f"first {missing[0]}); fetch it with: "
            f"python data/download_data.py --resource {name_or_path} --output_dir {root}")
    return [str(path) for path in paths]


@dataclass(frozen=True)
class NamedData:
    """What a data option stands for: its files, and the other keys of its config-group entry (``id_prefix`` of
    a passage source, the columns of a question file...; none for a plain path)."""

    files: list[str]
    options: Mapping[str, Any] = field(default_factory=dict)


def resolve_dataset(name: str, group: Mapping[str, Any] | None, data_dir: str | None = None) -> NamedData:
    """A name of a config group (``cfg.datasets``, ``cfg.ctx_sources``: an entry whose ``file`` is a resource key,
    a path or a glob), or else a path, glob or resource key itself."""
    entry = group.get(name) if group else None
    if entry is None:
        return NamedData(resolve_data_path(name, data_dir))
    if entry.get("file") is None:
        raise DataPathError(f"the configuration entry {name!r} has no 'file': set it to a path, a glob or a resource "
                            f"key")
    options = {key: value for key, value in entry.items() if key != "file"}
    return NamedData(resolve_data_path(str(entry["file"]), data_dir), options)
