"""Saved question encodings (`q_encoding_path`, GC-DPR's split flow) and the retriever's outputs: a record of what
made the vectors is checked before they are searched; every output is written atomically, its location checked
before any work; unreadable inputs are one line naming the file."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from dpr.foundation.errors import ConfigError
from dpr.foundation.files import UnwritableDirectoryError
from dpr.indexing import dense_retriever
from dpr.indexing.dense_retriever import run_dense_retriever
from dpr.indexing.question_encodings import QuestionEncodingsError, record_path
from tests.conftest import REPO_ROOT
from tests.fixtures import assert_same_but_float_noise
from tests.retrieval_helpers import retriever_config, tiny_model
from tests.test_dense_retriever import data  # noqa: F401 (the fixture: tiny model, 2 shards, 12 questions)


def config(data, out_file, model=None, qas=None, **values):  # noqa: F811
    return retriever_config(model or data["model"], qas or data["qas"], data["psgs"], data["embs"], str(out_file),
                            **values)


def encode_and_save(data, q_path, **values):  # noqa: F811
    assert run_dense_retriever(config(data, "", encode_q_and_save=True, q_encoding_path=str(q_path), **values)) == {}


def test_saved_encodings_of_another_model_are_refused(data, tmp_path):  # noqa: F811
    q_path = tmp_path / "q.pt"
    encode_and_save(data, q_path, **{"encoder.pretrained_model_cfg": tiny_model(tmp_path / "other", seed=1)})
    with pytest.raises(QuestionEncodingsError, match=r"q_encoding_path=.*q.pt was encoded by another model .*"
                                                     r"model.weights differs"):
        run_dense_retriever(config(data, tmp_path / "out.json", q_encoding_path=str(q_path)))
    assert not (tmp_path / "out.json").exists()


def test_saved_encodings_of_other_questions_are_refused(data, tmp_path):  # noqa: F811
    """Same number of questions, other texts: the vectors would be searched for the wrong questions."""
    q_path = tmp_path / "q.pt"
    encode_and_save(data, q_path)
    lines = open(data["qas"], encoding="utf-8").read().splitlines()
    other_qas = tmp_path / "other.csv"
    other_qas.write_text("\n".join(lines[1:] + lines[:1]) + "\n", encoding="utf-8")
    with pytest.raises(QuestionEncodingsError, match=r"q.pt holds the encodings of other questions"):
        run_dense_retriever(config(data, tmp_path / "out.json", qas=str(other_qas), q_encoding_path=str(q_path)))


def test_encodings_without_a_record_are_used_as_gc_dpr_saved_them(data, tmp_path):  # noqa: F811
    q_path = tmp_path / "q.pt"
    encode_and_save(data, q_path)
    assert isinstance(torch.load(q_path, weights_only=True), torch.Tensor)  # GC-DPR's format, unchanged
    record_path(q_path).unlink()
    run_dense_retriever(config(data, tmp_path / "direct.json"))
    run_dense_retriever(config(data, tmp_path / "loaded.json", q_encoding_path=str(q_path)))
    assert (tmp_path / "direct.json").read_text() == (tmp_path / "loaded.json").read_text()


def test_record_of_other_vectors_is_refused(data, tmp_path):  # noqa: F811
    """A record left beside vectors it does not describe (a write killed between the two files) is not believed."""
    q_path = tmp_path / "q.pt"
    encode_and_save(data, q_path)
    torch.save(torch.zeros(12, 8), q_path)
    with pytest.raises(QuestionEncodingsError, match=r"describes other vectors than q_encoding_path="):
        run_dense_retriever(config(data, tmp_path / "out.json", q_encoding_path=str(q_path)))


def test_unrecorded_encodings_of_another_width_are_one_line(data, tmp_path):  # noqa: F811
    """GC-DPR's encodings carry no record; vectors of another width than the index's are still refused in one
    line instead of failing inside FAISS."""
    q_path = tmp_path / "q.pt"
    torch.save(torch.zeros(12, 5), q_path)
    with pytest.raises(ConfigError, match=r"question vectors have 5 dimensions but the index's passage vectors"):
        run_dense_retriever(config(data, tmp_path / "out.json", q_encoding_path=str(q_path)))


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("damage", ["truncated", "payload", "not_a_matrix"])
def test_unreadable_encodings_are_one_line_naming_the_file(data, tmp_path, damage):  # noqa: F811
    q_path = tmp_path / "q.pt"
    encode_and_save(data, q_path)
    record_path(q_path).unlink()
    if damage == "truncated":
        q_path.write_bytes(q_path.read_bytes()[:200])
    elif damage == "payload":
        torch.save({"vectors": _Payload()}, q_path)
    else:
        torch.save({"vectors": [1, 2]}, q_path)
    with pytest.raises(QuestionEncodingsError, match=rf"q_encoding_path={q_path}"):
        run_dense_retriever(config(data, tmp_path / "out.json", q_encoding_path=str(q_path)))


@pytest.mark.parametrize("option", ["out_file", "q_encoding_path", "q_encoding_path_alone"])
def test_unwritable_output_fails_before_any_encoding(data, tmp_path, monkeypatch, option):  # noqa: F811
    def no_encoding(*args, **kwargs):
        raise AssertionError("the questions were encoded before the output was checked")

    monkeypatch.setattr(dense_retriever, "encode_questions", no_encoding)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    values = {"q_encoding_path": str(tmp_path / "q.pt")}
    out_file = tmp_path / "out.json"
    if option == "out_file":
        out_file = blocker / "out.json"
    else:
        values = {"q_encoding_path": str(blocker / "q.pt")}
        if option == "q_encoding_path_alone":
            values["encode_q_and_save"] = True
    name = "q_encoding_path" if option.startswith("q_") else "out_file"
    with pytest.raises(UnwritableDirectoryError, match=rf"^{name}={blocker}/"):
        run_dense_retriever(config(data, out_file, **values))


def _fail_midway(real_write, path_position):
    def write_then_fail(*args):
        real_write(*args)
        path = args[path_position]
        with open(path, "r+b") as file:
            file.truncate(os.path.getsize(path) // 2)
        raise OSError(28, "No space left on device")
    return write_then_fail


def test_failed_writes_keep_the_previous_outputs(data, tmp_path, monkeypatch):  # noqa: F811
    """A results JSON or question encodings whose write fails (a full disk here) leave the previous file, not a
    partial one, and the failure is one line naming the file."""
    from dpr.foundation.files import OutputWriteError

    q_path, out_file = tmp_path / "q.pt", tmp_path / "out.json"
    run_dense_retriever(config(data, out_file, q_encoding_path=str(q_path)))
    before = {path: path.read_bytes() for path in (q_path, record_path(q_path), out_file)}
    monkeypatch.setattr(dense_retriever, "write_retrieval_results",
                        _fail_midway(dense_retriever.write_retrieval_results, 0))
    with pytest.raises(OutputWriteError, match=rf"could not write {out_file}"):
        run_dense_retriever(config(data, out_file, q_encoding_path=str(q_path)))
    monkeypatch.setattr(torch, "save", _fail_midway(torch.save, 1))
    with pytest.raises(OutputWriteError, match=rf"could not write {q_path}"):
        run_dense_retriever(config(data, out_file, q_encoding_path=str(q_path), re_encode_q=True))
    assert {path: path.read_bytes() for path in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in before)
    json.loads(out_file.read_text())


def _script(data, out_dir):  # noqa: F811
    cfg = config(data, out_dir / "results.json", q_encoding_path=str(out_dir / "q.pt"))
    args = [f"{key}={value}" for key, value in (
        ("encoder.pretrained_model_cfg", data["model"]), ("encoder.sequence_length", cfg.encoder.sequence_length),
        ("qa_dataset", data["qas"]), ("ctx_datatsets", f"[{data['psgs']}]"),
        ("encoded_ctx_files", f"['{data['embs']}']"), ("out_file", cfg.out_file), ("n_docs", cfg.n_docs),
        ("validation_workers", 1), ("batch_size", cfg.batch_size), ("q_encoding_path", cfg.q_encoding_path))]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    return [sys.executable, str(REPO_ROOT / "dense_retriever.py"), *args], env


def test_kill_at_random_points_never_leaves_a_partial_output(data, tmp_path):  # noqa: F811
    """kill -9 anywhere in a run: the results JSON and the question encodings are absent or complete under their
    final names, and a rerun gives the uninterrupted results."""
    reference_dir = tmp_path / "reference"
    command, env = _script(data, reference_dir)
    started = time.monotonic()
    subprocess.run(command, cwd=tmp_path, env=env, check=True, capture_output=True, timeout=300)
    duration = time.monotonic() - started
    expected = json.loads((reference_dir / "results.json").read_text())
    expected_vectors = torch.load(reference_dir / "q.pt", weights_only=True)
    for point, fraction in enumerate(sorted(random.Random(0).uniform(0.4, 1.0) for _ in range(3))):
        out_dir = tmp_path / f"killed_{point}"
        command, env = _script(data, out_dir)
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        time.sleep(duration * fraction)
        process.send_signal(signal.SIGKILL)
        process.wait()
        # each run is a process of its own: its scores and vectors equal the reference's to float noise
        if (out_dir / "results.json").exists():
            assert_same_but_float_noise(json.loads((out_dir / "results.json").read_text()), expected)
        if (out_dir / "q.pt").exists():
            torch.testing.assert_close(torch.load(out_dir / "q.pt", weights_only=True), expected_vectors,
                                       rtol=1e-5, atol=1e-6)
        subprocess.run(command, cwd=tmp_path, env=env, check=True, capture_output=True, timeout=300)
        assert_same_but_float_noise(json.loads((out_dir / "results.json").read_text()), expected)
