"""generate_dense_embeddings: shard coverage, padding/sorting/worker invariance, formats, reruns, checkpoint halves."""
import gzip
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from dpr.data.embeddings_io import read_embeddings, shard_path
from dpr.indexing import generate_embeddings
from dpr.indexing.generate_embeddings import generate_dense_embeddings
from dpr.options.legacy_flags import config_top_level_keys, translate_argv
from dpr.options.retriever_flags import GEN_EMBS_FLAGS, GEN_EMBS_GC_DEFAULTS
from tests.conftest import REPO_ROOT
from tests.retrieval_helpers import (
    encode_directly,
    gen_embs_config,
    passages,
    tiny_model,
    write_biencoder_checkpoint,
    write_passages_tsv,
)
from tests.training_helpers import CONF_DIR, compose_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gen")
    return {"model": tiny_model(folder / "bert"), "psgs": write_passages_tsv(folder / "psgs.tsv"), "dir": folder}


def embed_all_shards(data, out_file, num_shards, **values):
    shards = []
    for shard_id in range(num_shards):
        cfg = gen_embs_config(data["model"], data["psgs"], out_file, shard_id=shard_id, num_shards=num_shards,
                              **values)
        shards.append(read_embeddings(generate_dense_embeddings(cfg)))
    return shards


@pytest.mark.parametrize("num_shards", [5, 10])  # 10: ceil(23/10)=3, so shard 7 is short and 8, 9 are empty
def test_every_passage_lands_in_exactly_one_shard_in_file_order(data, tmp_path, num_shards):
    shards = embed_all_shards(data, tmp_path / "emb", num_shards)
    ids = [doc_id for shard_ids, _ in shards for doc_id in shard_ids]
    assert ids == [row[0] for row in passages()]  # 23 passages, none dropped (GC would drop the remainder)
    sizes = [len(shard_ids) for shard_ids, _ in shards]
    assert max(sizes) == -(-23 // num_shards) and len(shards) == num_shards


def test_vectors_equal_an_unsorted_fixed_padding_single_batch_encoding(data, tmp_path):
    rows = passages()
    reference = encode_directly(data["model"], [r[1] for r in rows], [r[2] for r in rows]).numpy()
    sorted_dynamic = embed_all_shards(data, tmp_path / "dyn", 2, num_workers=2)
    fixed_unsorted = embed_all_shards(data, tmp_path / "fixed", 2, sort_by_length=False, encoder__pad_to_max=True)
    for shards in (sorted_dynamic, fixed_unsorted):
        ids = [i for shard_ids, _ in shards for i in shard_ids]
        vectors = np.concatenate([v for _, v in shards])
        assert ids == [r[0] for r in rows]
        np.testing.assert_allclose(vectors, reference, atol=2e-5)


def test_output_formats_gzip_input_and_id_prefix(data, tmp_path):
    gz_path = tmp_path / "psgs.tsv.gz"
    with open(data["psgs"], "rb") as plain, gzip.open(gz_path, "wb") as packed:
        packed.write(plain.read())
    source = {"+ctx_sources.mine.file": str(gz_path), "+ctx_sources.mine.id_prefix": "wiki:"}
    outputs = {}
    for fmt in ("dpr", "gc", "npz"):
        cfg = gen_embs_config(data["model"], "mine", tmp_path / fmt / "emb", out_format=fmt, **source)
        outputs[fmt] = generate_dense_embeddings(cfg)
    assert outputs["dpr"].name == "emb_0" and outputs["gc"].name == "emb_0.pkl" and outputs["npz"].name == "emb_0.npz"
    with open(outputs["dpr"], "rb") as file:
        records = pickle.load(file)
    assert isinstance(records, list) and records[0][0] == "wiki:1" and len(records) == 23
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 and v.shape == (32,) for _, v in records)
    with np.load(outputs["npz"], allow_pickle=False) as arrays:
        assert arrays["vectors"].dtype == np.float32 and arrays["ids"][0] == "wiki:1"
        np.testing.assert_array_equal(arrays["vectors"], np.stack([v for _, v in records]))


def test_a_complete_shard_is_skipped_on_rerun(data, tmp_path, monkeypatch):
    cfg = gen_embs_config(data["model"], data["psgs"], tmp_path / "emb", num_shards=2, shard_id=1)
    path = generate_dense_embeddings(cfg)
    before = os.stat(path).st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("a complete shard of the same provenance must not be embedded again")

    monkeypatch.setattr(generate_embeddings, "encode_batches", fail)
    assert generate_dense_embeddings(cfg) == path and os.stat(path).st_mtime_ns == before
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def test_encoder_type_selects_the_checkpoint_half(data, tmp_path):
    question_model = tiny_model(tmp_path / "q", seed=1)
    checkpoint = write_biencoder_checkpoint(tmp_path / "dpr_biencoder.0", question_model, data["model"])
    rows = passages()
    for encoder_type, model_dir in (("ctx", data["model"]), ("question", question_model)):
        cfg = gen_embs_config("unused", data["psgs"], tmp_path / encoder_type / "emb", model_file=checkpoint,
                              encoder_type=encoder_type)
        _, vectors = read_embeddings(generate_dense_embeddings(cfg))
        expected = encode_directly(model_dir, [r[1] for r in rows], [r[2] for r in rows]).numpy()
        np.testing.assert_allclose(vectors, expected, atol=2e-5)


def test_gc_flags_map_onto_the_config():
    argv = ["--model_file", "cp", "--ctx_file", "psgs.tsv", "--out_file", "embs/wiki", "--shard_id", "3",
            "--num_shards", "50", "--batch_size", "64", "--fp16", "--sequence_length", "256", "--do_lower_case"]
    overrides = translate_argv(argv, GEN_EMBS_FLAGS, GEN_EMBS_GC_DEFAULTS, config_top_level_keys(CONF_DIR, "gen_embs"))
    cfg = compose_config(overrides, "gen_embs")
    assert (cfg.model_file, cfg.ctx_src, cfg.out_file) == ("cp", "psgs.tsv", "embs/wiki")
    assert (cfg.shard_id, cfg.num_shards, cfg.batch_size, cfg.fp16) == (3, 50, 64, True)
    assert cfg.encoder.sequence_length == 256 and cfg.do_lower_case is True
    assert cfg.out_format == "gc"  # GC-DPR's {out_file}_{shard_id}.pkl
    assert shard_path(cfg.out_file, cfg.shard_id, cfg.out_format).name == "wiki_3.pkl"


def test_multirun_through_the_script_writes_every_shard(data, tmp_path):
    out_file = tmp_path / "embs" / "psgs"
    command = [sys.executable, str(REPO_ROOT / "generate_dense_embeddings.py"), "-m", "shard_id=0,1",
               "num_shards=2", f"encoder.pretrained_model_cfg={data['model']}", "encoder.sequence_length=64",
               f"ctx_src={data['psgs']}", f"out_file={out_file}", "out_format=npz", "num_workers=0",
               f"hydra.sweep.dir={tmp_path / 'multirun'}"]
    subprocess.run(command, check=True, cwd=tmp_path, capture_output=True, timeout=300)
    ids = [i for shard in range(2) for i in read_embeddings(shard_path(out_file, shard, "npz"))[0]]
    assert ids == [row[0] for row in passages()]


def test_slurm_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose("gen_embs", overrides=["hydra/launcher=slurm", "shard_id=3"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == (1, 1, 1)
    assert cfg.shard_id == 3


def test_fp16_on_cpu_is_refused_with_a_message(data, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU machine, also where a GPU is present
    cfg = gen_embs_config(data["model"], data["psgs"], tmp_path / "emb", fp16=True)
    with pytest.raises(ValueError, match="bf16"):
        generate_dense_embeddings(cfg)


FAULTS_OF_REPEATED_ALLOCATIONS = """
import resource, sys, torch
from dpr.indexing.encoding import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
torch.empty(8 << 20).fill_(1.0)  # the first allocation faults in its pages either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(30):
    torch.empty(8 << 20).fill_(1.0)  # 32 MiB, as an activation of a forward: allocated, written, freed
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_activation_memory_is_reused_without_page_faults():
    faults = {}
    for mode in ("default", "keep"):
        done = subprocess.run([sys.executable, "-c", FAULTS_OF_REPEATED_ALLOCATIONS, mode], cwd=REPO_ROOT,
                              check=True, capture_output=True, text=True)
        kept, faults[mode] = done.stdout.split()
    assert kept == "True"
    assert int(faults["default"]) > 30 * 8000  # every 32 MiB allocation touches 8,192 fresh pages
    assert int(faults["keep"]) < 5 * 8192  # after the heap has grown for the first few, their pages are reused
