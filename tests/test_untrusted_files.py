"""Files from the internet never run code: checkpoints, embedding shards and index id maps carrying a pickle
payload are refused by the loaders and by every entry script, while DPR's own formats still load."""
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from dpr.data.embeddings_io import ShardFileError, read_embeddings, write_embeddings
from dpr.indexing.faiss_indexers import DenseFlatIndexer
from dpr.foundation.checkpoints import CheckpointError, load_checkpoint
from dpr.foundation.safe_pickle import UnreadablePickleError, UnsafePickleError
from tests.fixtures import PickledPayload
from tests.retrieval_helpers import tiny_model, write_biencoder_checkpoint, write_passages_tsv, write_questions_csv

REPO = Path(__file__).resolve().parents[1]


def dpr_state(encoder_params) -> dict:
    return {"model_dict": {"question_model.w": torch.ones(2)}, "optimizer_dict": None, "scheduler_dict": None,
            "offset": 3, "epoch": 1, "encoder_params": encoder_params}


def test_dpr_checkpoint_with_omegaconf_encoder_params_loads(tmp_path):
    """Hydra DPR pickles cfg.encoder as a DictConfig (nested values, a list, None): read without full unpickling."""
    encoder = OmegaConf.create({"encoder_model_type": "hf_bert", "pretrained_model_cfg": "bert-base-uncased",
                                "projection_dim": 0, "sequence_length": 256, "dropout": 0.1, "pretrained": True,
                                "pretrained_file": None, "extra": {"layers": [1, 2]}})
    path = tmp_path / "dpr_biencoder.1"
    torch.save(dpr_state({"do_lower_case": True, "encoder": encoder}), path)
    state = load_checkpoint(str(path))
    assert state.encoder_params == {"do_lower_case": True, "encoder": {
        "encoder_model_type": "hf_bert", "pretrained_model_cfg": "bert-base-uncased", "projection_dim": 0,
        "sequence_length": 256, "dropout": 0.1, "pretrained": True, "pretrained_file": None,
        "extra": {"layers": [1, 2]}}}
    assert (state.epoch, state.offset) == (1, 3) and torch.equal(state.model_dict["question_model.w"], torch.ones(2))


def test_checkpoint_with_a_payload_is_refused_unless_trusted(tmp_path, caplog):
    path, marker = tmp_path / "evil.cp", tmp_path / "ran"
    torch.save(dpr_state({"do_lower_case": PickledPayload(marker)}), path)
    with pytest.raises(CheckpointError, match=r"evil.cp holds posix.system.*trust_checkpoint=true"):
        load_checkpoint(str(path))
    assert not marker.exists()
    load_checkpoint(str(path), trust=True)  # the user's explicit choice: full unpickling, with a warning
    assert marker.exists() and "trust_checkpoint=true" in caplog.text


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"not a checkpoint at all", "is truncated or not a checkpoint: Unsupported operand"),
    (None, "does not exist"),
])
def test_unreadable_checkpoints_say_what_is_wrong(tmp_path, content, message, caplog):
    path = tmp_path / "dpr_biencoder.0"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(str(path))
    assert "weights_only=False" not in caplog.text


def test_truncated_checkpoint_is_named(tmp_path):
    good = tmp_path / "good"
    torch.save(dpr_state({}), good)
    truncated = tmp_path / "truncated"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"truncated.* is truncated or not a checkpoint"):
        load_checkpoint(str(truncated))


def test_embedding_shard_with_a_payload_is_refused(tmp_path):
    path, marker = tmp_path / "emb_0", tmp_path / "ran"
    path.write_bytes(pickle.dumps([("1", np.zeros(4, np.float32)), ("2", PickledPayload(marker))]))
    with pytest.raises(UnsafePickleError, match=r"emb_0: refused to unpickle posix.system"):
        read_embeddings(path)
    assert not marker.exists()


def test_dpr_shards_with_numpy_ids_and_protocols_still_load(tmp_path):
    vectors = np.arange(12, dtype=np.float32).reshape(3, 4)
    for protocol in (2, 3, 4, 5):
        path = tmp_path / f"emb_p{protocol}"
        records = [(np.str_(f"d{i}"), vector, np.int64(i)) for i, vector in enumerate(vectors)]
        path.write_bytes(pickle.dumps(records, protocol=protocol))
        ids, read = read_embeddings(path)
        assert ids == ["d0", "d1", "d2"] and np.array_equal(read, vectors)


@pytest.mark.parametrize("content", [b"", b"\x80\x04\x95\x10\x00"])
def test_empty_or_truncated_shard_is_named(tmp_path, content):
    path = tmp_path / "emb_3"
    path.write_bytes(content)
    with pytest.raises(UnreadablePickleError, match=r"emb_3: truncated or not a DPR embedding shard"):
        read_embeddings(path)


def test_shard_of_the_wrong_shape_and_truncated_npz_are_named(tmp_path):
    wrong = tmp_path / "emb_1"
    wrong.write_bytes(pickle.dumps({"not": "a list"}))
    with pytest.raises(ShardFileError, match="emb_1: not an embedding shard"):
        read_embeddings(wrong)
    whole = write_embeddings(tmp_path / "emb_2.npz", ["a"], np.ones((1, 4), np.float32))
    whole.write_bytes(whole.read_bytes()[:40])
    with pytest.raises(ShardFileError, match="emb_2.npz: truncated or not an embedding shard"):
        read_embeddings(whole)


def test_pickled_index_id_map_with_a_payload_is_refused(tmp_path):
    index = DenseFlatIndexer()
    index.index_data([(["a", "b"], np.eye(2, 4, dtype=np.float32))])
    index.serialize(tmp_path)
    meta, marker = tmp_path / "index_meta.dpr", tmp_path / "ran"
    meta.write_bytes(pickle.dumps(["a", PickledPayload(marker)]))
    with pytest.raises(UnsafePickleError, match=r"index_meta.dpr: refused to unpickle posix.system"):
        DenseFlatIndexer().deserialize(tmp_path)
    assert not marker.exists()
    meta.write_bytes(pickle.dumps(["a", "b"]))  # DPR's own pickled id list still loads
    restored = DenseFlatIndexer()
    restored.deserialize(tmp_path)
    assert restored.index_id_to_db_id == ["a", "b"]


# ------------------------------------------------------------------------------------------ every entry script
@pytest.fixture(scope="module")
def payloads(tmp_path_factory):
    folder = tmp_path_factory.mktemp("untrusted")
    model = tiny_model(folder / "bert")
    good = write_biencoder_checkpoint(folder / "good.cp", model, model)
    state = torch.load(good, weights_only=True)
    state["encoder_params"]["do_lower_case"] = PickledPayload(folder / "ran_checkpoint")
    evil_checkpoint = folder / "evil.cp"
    torch.save(state, evil_checkpoint)
    evil_shard = folder / "emb_0"
    evil_shard.write_bytes(pickle.dumps([("1", PickledPayload(folder / "ran_shard"))]))
    return {"folder": folder, "model": model, "checkpoint": str(evil_checkpoint), "shard": str(evil_shard),
            "passages": write_passages_tsv(folder / "psgs.tsv"), "questions": write_questions_csv(folder / "q.csv")}


def run_script(args, cwd):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def entry_commands(p, tmp_path):
    common = [f"encoder.pretrained_model_cfg={p['model']}", "encoder.sequence_length=32"]
    return {
        "train_dense_encoder": [str(REPO / "train_dense_encoder.py"), f"model_file={p['checkpoint']}",
                                f"train_datasets=[{p['passages']}]", f"output_dir={tmp_path / 'train'}", *common],
        "generate_dense_embeddings": [str(REPO / "generate_dense_embeddings.py"), f"model_file={p['checkpoint']}",
                                      f"ctx_src={p['passages']}", f"out_file={tmp_path / 'emb'}", *common],
        "dense_retriever (checkpoint)": [str(REPO / "dense_retriever.py"), f"model_file={p['checkpoint']}",
                                         f"qa_dataset={p['questions']}", f"ctx_datatsets=[{p['passages']}]",
                                         f"encoded_ctx_files=[{p['shard']}]", *common],
        "dense_retriever (shard)": [str(REPO / "dense_retriever.py"), f"qa_dataset={p['questions']}",
                                    f"ctx_datatsets=[{p['passages']}]", f"encoded_ctx_files=[{p['shard']}]",
                                    f"out_file={tmp_path / 'results.json'}", *common],
        "train_reader": [str(REPO / "train_reader.py"), f"model_file={p['checkpoint']}",
                         f"dev_files={p['passages']}", f"output_dir={tmp_path / 'reader'}", *common],
        "convert_dpr_checkpoint": [str(REPO / "convert_dpr_checkpoint.py"), "export-biencoder", p["checkpoint"],
                                   str(tmp_path / "hf")],
    }


@pytest.mark.parametrize("script", ["train_dense_encoder", "generate_dense_embeddings", "dense_retriever (checkpoint)",
                                    "dense_retriever (shard)", "train_reader", "convert_dpr_checkpoint"])
def test_every_entry_script_refuses_payloads_in_one_line(payloads, tmp_path, script):
    proc = run_script(entry_commands(payloads, tmp_path)[script], tmp_path)
    last_line = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert last_line.startswith("error: ") and "posix.system" in last_line, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (payloads["folder"] / "ran_checkpoint").exists() and not (payloads["folder"] / "ran_shard").exists()


def test_payload_in_a_model_directory_is_one_line_naming_the_weights_file(payloads, tmp_path):
    """A pretrained model directory whose pytorch_model.bin carries a pickle payload: torch's weights-only load
    refuses it, and the script says so in one line naming the file."""
    model = Path(tiny_model(tmp_path / "bert"))
    for weights in model.glob("*.safetensors"):
        weights.unlink()
    torch.save({"embeddings.word_embeddings.weight": PickledPayload(tmp_path / "ran")}, model / "pytorch_model.bin")
    proc = run_script([str(REPO / "dense_retriever.py"), f"encoder.pretrained_model_cfg={model}",
                       "encoder.sequence_length=32", f"qa_dataset={payloads['questions']}",
                       f"ctx_datatsets=[{payloads['passages']}]", "retriever=dense", "encode_q_and_save=true",
                       f"q_encoding_path={tmp_path / 'q.pt'}"], tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {model / 'pytorch_model.bin'}: refused")
    assert "Traceback" not in proc.stderr and not (tmp_path / "ran").exists() and not (tmp_path / "q.pt").exists()


def test_payload_in_question_encodings_is_one_line_naming_the_file(payloads, tmp_path):
    q_path = tmp_path / "q.pt"
    torch.save([PickledPayload(tmp_path / "ran")], q_path)
    proc = run_script([str(REPO / "dense_retriever.py"), f"encoder.pretrained_model_cfg={payloads['model']}",
                       "encoder.sequence_length=32", f"qa_dataset={payloads['questions']}",
                       f"ctx_datatsets=[{payloads['passages']}]", f"encoded_ctx_files=[{payloads['shard']}]",
                       f"q_encoding_path={q_path}", f"out_file={tmp_path / 'results.json'}"], tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: q_encoding_path={q_path}: refused")
    assert "Traceback" not in proc.stderr and not (tmp_path / "ran").exists()
