"""Configuration mistakes in the retrieval scripts end in one line naming the key, not a traceback."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
