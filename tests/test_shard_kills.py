"""`kill -9` at a few points of a re-embed through generate_dense_embeddings.py: at no moment is a stale shard
searchable, and a rerun ends with the shards and records of an uninterrupted run, no temporary left."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dpr.data.embeddings_io import expand_embedding_paths, read_embeddings
from dpr.indexing.shard_provenance import ShardProvenanceError, check_shard_sets, read_provenance
from dpr.indexing.generate_embeddings import generate_dense_embeddings
from tests.retrieval_helpers import SEQUENCE_LENGTH, gen_embs_config, tiny_model, write_passages_tsv

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kills")
    return {"old": tiny_model(folder / "old", seed=0), "new": tiny_model(folder / "new", seed=5),
            "psgs": write_passages_tsv(folder / "psgs.tsv")}


def start_embedding(data, model, out_file, shard_id):
    command = [sys.executable, str(REPO / "generate_dense_embeddings.py"), f"encoder.pretrained_model_cfg={model}",
               f"encoder.sequence_length={SEQUENCE_LENGTH}", f"ctx_src={data['psgs']}", f"out_file={out_file}",
               f"shard_id={shard_id}", "num_shards=2", "num_workers=0", "batch_size=4",
               f"hydra.run.dir={Path(out_file).parent / 'hydra'}"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def embed_in_process(data, model, out_file, shard_id):
    generate_dense_embeddings(gen_embs_config(model, data["psgs"], out_file, shard_id=shard_id, num_shards=2))


def embed(data, model, out_file, shard_id):
    process = start_embedding(data, model, out_file, shard_id)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]


def assert_never_stale(folder: Path) -> None:
    """The set is refused, or each of its shards has the record written with it."""
    shards = expand_embedding_paths(str(folder / "emb_*"))
    try:
        check_shard_sets([shards])
    except ShardProvenanceError:
        return
    assert all(read_provenance(shard) is not None for shard in shards)


def shard_0(folder: Path) -> tuple[dict, tuple]:
    return read_provenance(folder / "emb_0"), read_embeddings(folder / "emb_0")


def test_kill_9_during_a_re_embed_never_leaves_a_stale_shard_and_a_rerun_completes_it(data, tmp_path):
    reference = tmp_path / "reference"
    started = time.perf_counter()
    embed(data, data["new"], reference / "emb", 0)
    run_seconds = time.perf_counter() - started

    killed = tmp_path / "killed"
    for shard_id in range(2):
        embed_in_process(data, data["old"], killed / "emb", shard_id)
    rng = random.Random(0)
    for fraction in (0.6, 0.85, 0.95):
        process = start_embedding(data, data["new"], killed / "emb", 0)
        deadline = time.perf_counter() + run_seconds * fraction * rng.uniform(0.9, 1.1)
        while time.perf_counter() < deadline and process.poll() is None:
            assert_never_stale(killed)
            time.sleep(0.02)
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.communicate()
        assert_never_stale(killed)
        # back to the old model's shard, so that the next kill interrupts a re-embed again
        embed_in_process(data, data["old"], killed / "emb", 0)

    embed(data, data["new"], killed / "emb", 0)
    (record, (ids, vectors)), (expected_record, (expected_ids, expected_vectors)) = shard_0(killed), shard_0(reference)
    assert record == expected_record and ids == expected_ids
    np.testing.assert_allclose(vectors, expected_vectors, rtol=1e-5, atol=1e-6)  # two processes: float noise
    assert not [name for name in os.listdir(killed) if name.endswith(".tmp")]
