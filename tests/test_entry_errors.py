"""Configuration mistakes in the retrieval scripts end in one line naming the key, not a traceback."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dpr.data.embeddings_io import write_embeddings

from tests.retrieval_helpers import tiny_model, write_passages_tsv, write_questions_csv

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("entry_errors")
    return {"model": tiny_model(folder / "bert"), "psgs": write_passages_tsv(folder / "psgs.tsv"),
            "qas": write_questions_csv(folder / "q.csv")}


@pytest.mark.parametrize("script, args, message", [
    ("dense_retriever.py", ["ctx_datatsets=[{psgs}]", "encoded_ctx_files=[x]"], "qa_dataset is required"),
    ("dense_retriever.py", ["qa_dataset={qas}", "ctx_datatsets=[{psgs}]"], "encoded_ctx_files is required"),
    ("generate_dense_embeddings.py", ["ctx_src={psgs}"], "out_file is required"),
    ("generate_dense_embeddings.py", ["ctx_src={psgs}", "out_file={tmp}/emb", "shard_id=7", "num_shards=2"],
     "shard_id 7 is not in"),
])
def test_retrieval_config_mistakes_are_one_line(data, tmp_path, script, args, message):
    values = dict(data, tmp=tmp_path)
    command = [sys.executable, str(REPO / script), f"encoder.pretrained_model_cfg={data['model']}",
               "encoder.sequence_length=32", *(arg.format(**values) for arg in args)]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    last_line = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and last_line.startswith("error: ") and message in last_line, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("script, args", [
    ("train_dense_encoder.py", ["--fp16", "--no_cuda", "--train_file", "{qas}", "--output_dir", "{tmp}/out"]),
    ("train_dense_encoder.py", ["fp16=true", "no_cuda=true", "train_datasets=[{qas}]", "output_dir={tmp}/out"]),
    ("train_reader.py", ["--fp16", "--no_cuda", "--train_file", "{tmp}/r.json", "--output_dir", "{tmp}/out"]),
    ("generate_dense_embeddings.py", ["--fp16", "--no_cuda", "--ctx_file", "{psgs}", "--out_file", "{tmp}/emb"]),
    ("dense_retriever.py", ["--fp16", "--no_cuda", "--qa_file", "{qas}", "--ctx_file", "{psgs}",
                            "--encoded_ctx_file", "{tmp}/emb_*"]),
])
def test_fp16_on_a_machine_without_cuda_is_one_line(data, tmp_path, script, args):
    """Every entry script that takes fp16 (GC-DPR's --fp16 or hydra's fp16=true) refuses it without CUDA in one
    line naming bf16, before any data is read (the training files here do not exist)."""
    values = dict(data, tmp=tmp_path)
    if script == "dense_retriever.py":  # a shard to search: the question encoder runs after the shard checks
        hidden = json.loads((Path(data["model"]) / "config.json").read_text())["hidden_size"]
        write_embeddings(tmp_path / "emb_0", [str(i + 1) for i in range(23)], np.ones((23, hidden)))
    legacy = args[0].startswith("--")
    model = ["--pretrained_model_cfg", data["model"]] if legacy else [f"encoder.pretrained_model_cfg={data['model']}"]
    command = [sys.executable, str(REPO / script), *model, *(arg.format(**values) for arg in args)]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and lines[-1].startswith("error: fp16 needs a CUDA device"), proc.stderr[-2000:]
    assert "bf16=true" in lines[-1] and "Traceback" not in proc.stderr
