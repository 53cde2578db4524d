"""RESOURCES_MAP contents (spec §7), raw-prefix matching, DPR's local layout and resolve_data_path."""
from pathlib import Path

import pytest

from dpr.data.resources import (DPR_BASE_URL, RESOURCES_MAP, local_paths, matching_keys, resolve_data_path)

EXTRA_KEYS = {"compressed-data.wikipedia_split.psgs_w100", "data.squad1.train", "data.squad1.dev"}


def test_dpr_superset_plus_gc_and_squad_keys():
    assert len(RESOURCES_MAP) == 53 + len(EXTRA_KEYS)
    assert EXTRA_KEYS <= set(RESOURCES_MAP)
    assert all(resource.description for resource in RESOURCES_MAP.values())


@pytest.mark.parametrize("key, url, ext, compressed, nq", [
    ("data.wikipedia_split.psgs_w100", DPR_BASE_URL + "wikipedia_split/psgs_w100.tsv.gz", ".tsv", True, False),
    ("compressed-data.wikipedia_split.psgs_w100", DPR_BASE_URL + "wikipedia_split/psgs_w100.tsv.gz", ".tsv.gz",
     False, False),
    ("data.retriever.webq-dev", DPR_BASE_URL + "data/retriever/biencoder-webquestions-dev.json.gz", ".json", True,
     False),
    ("data.retriever.qas.nq-test", DPR_BASE_URL + "data/retriever/nq-test.qa.csv", ".csv", False, True),
    ("checkpoint.retriever.multiset.bert-base-encoder",
     DPR_BASE_URL + "checkpoint/retriver/multiset/hf_bert_base.cp", ".cp", False, False),
    ("indexes.single.nq.subset.index_meta", DPR_BASE_URL + "checkpoint/indexes/single/nq/seen_only.index_meta.dpr",
     ".dpr", False, False),
    ("data.squad1.dev", "https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v1.1.json", ".json", False, False),
])
def test_resource_entries(key, url, ext, compressed, nq):
    resource = RESOURCES_MAP[key]
    assert (resource.urls()[0], resource.ext, resource.compressed, resource.nq_license) == (url, ext, compressed, nq)


def test_list_valued_resources():
    shards = RESOURCES_MAP["data.retriever_results.nq.single.wikipedia_passages"]
    assert len(shards.urls()) == 50 and shards.urls()[49].endswith("data/wiki_encoded/single/nq/wiki_passages_49")
    assert len(RESOURCES_MAP["data.reader.nq.single.train"].urls()) == 8


def test_mirror_replaces_the_base_url():
    resource = RESOURCES_MAP["data.retriever.qas.nq-dev"]
    assert resource.urls("file:///mirror/") == ["file:///mirror/data/retriever/nq-dev.qa.csv"]


@pytest.mark.parametrize("name, expected", [
    ("data.retriever.nq", {"data.retriever.nq-dev", "data.retriever.nq-train", "data.retriever.nq-adv-hn-train"}),
    ("checkpoint.retriever.single", {"checkpoint.retriever.single.nq.bert-base-encoder",
                                     "checkpoint.retriever.single-adv-hn.nq.bert-base-encoder"}),
    ("data.retriever.nq-dev", {"data.retriever.nq-dev"}),
    ("no.such.key", set()),
])
def test_raw_prefix_matching(name, expected):
    assert set(matching_keys(name)) == expected


def test_data_prefix_matches_every_data_resource():
    assert set(matching_keys("data")) == {key for key in RESOURCES_MAP if key.startswith("data")}
    assert "compressed-data.wikipedia_split.psgs_w100" not in matching_keys("data")


def test_local_layout():
    root = Path("/root")
    assert local_paths("data.retriever.nq-dev", root) == [root / "downloads/data/retriever/nq-dev.json"]
    shards = local_paths("data.retriever_results.nq.single.wikipedia_passages", root)
    assert shards[0] == root / "downloads/data/retriever_results/nq/single/wikipedia_passages_0.pkl"
    assert local_paths("data.reader.nq.single.dev", root) == [root / "downloads/data/reader/nq/single/dev_0.pkl"]


def test_resolve_existing_path_and_glob(tmp_path):
    for name in ("b.pkl", "a.pkl"):
        (tmp_path / name).write_text("x")
    assert resolve_data_path(str(tmp_path / "a.pkl")) == [str(tmp_path / "a.pkl")]
    assert resolve_data_path(str(tmp_path / "*.pkl")) == [str(tmp_path / "a.pkl"), str(tmp_path / "b.pkl")]


def test_resolve_resource_key(tmp_path, monkeypatch):
    target = tmp_path / "downloads/data/retriever/qas/nq-test.csv"
    target.parent.mkdir(parents=True)
    target.write_text("q\t['a']\n")
    assert resolve_data_path("data.retriever.qas.nq-test", str(tmp_path)) == [str(target)]
    monkeypatch.setenv("DPR_DATA_DIR", str(tmp_path))
    assert resolve_data_path("data.retriever.qas.nq-test") == [str(target)]
    monkeypatch.delenv("DPR_DATA_DIR")
    monkeypatch.chdir(tmp_path)
    assert resolve_data_path("data.retriever.qas.nq-test") == [str(Path.cwd() / target.relative_to(tmp_path))]


def test_missing_resource_names_the_download_command(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        resolve_data_path("data.retriever.nq-dev", str(tmp_path))
    assert f"python data/download_data.py --resource data.retriever.nq-dev --output_dir {tmp_path}" in str(error.value)


def test_unknown_name_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an existing file"):
        resolve_data_path(str(tmp_path / "nothing*.json"))
