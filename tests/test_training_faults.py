"""What goes wrong around a training run (project issue 10) and the settings it refuses: each fault is found at
the start of the run, or named when it happens, and never costs the checkpoints already written."""
import os
import pathlib
import shutil
from types import SimpleNamespace

import pytest
import torch

from dpr.foundation import checkpoints
from dpr.foundation.checkpoints import CheckpointError, CheckpointState, CheckpointWriteError
from dpr.foundation.files import UnwritableDirectoryError, remove_stale_temporaries
from dpr.training.biencoder_trainer import BiEncoderTrainer
from dpr.foundation.errors import ConfigError
from tests.fixtures import write_retriever_json
from tests.tiny_models import tiny_bert_dir
from tests.training_helpers import compose_config, run_trainer, tiny_overrides


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults")
    return {
        "model": tiny_bert_dir(folder / "bert", dropout=0.1),
        "train": write_retriever_json(folder / "train.json", 16),
        "dev": write_retriever_json(folder / "dev.json", 4),
        "dir": folder,
    }


def config(data, output_dir, **extra):
    return compose_config(tiny_overrides(data["model"], data["train"], data["dev"], str(output_dir), **extra))


@pytest.fixture(scope="module")
def trained(data):
    """One epoch of 4 updates with checkpoints after update 2 (dpr_biencoder.0.2) and at the end (dpr_biencoder.0)."""
    output_dir = data["dir"] / "trained"
    run_trainer(config(data, output_dir, train__eval_per_epoch=2))
    return output_dir


@pytest.mark.parametrize("key,value", [("n_gpu", 2), ("distributed_world_size", 4), ("distributed_port", 29500),
                                       ("device", "cuda"), ("special_tokens", "[x]"), ("multi_q_encoder", "true"),
                                       ("local_shards_dataloader", "true")])
def test_dpr_keys_for_machinery_not_here_are_refused_unless_at_their_default(data, tmp_path, key, value):
    with pytest.raises(ConfigError, match=rf"^{key}=.* is not supported .*leave {key} at"):
        BiEncoderTrainer(config(data, tmp_path, **{key: value}))


def test_dpr_keys_for_machinery_not_here_are_refused_by_the_reader_too(tmp_path):
    from dpr.training.reader_trainer import ReaderTrainer

    cfg = compose_config([f"output_dir={tmp_path}", "n_gpu=8"], "extractive_reader_train_cfg")
    with pytest.raises(ConfigError, match="n_gpu=8 is not supported"):
        ReaderTrainer(cfg)


def test_one_gradient_rule_compensation_over_accumulation(data, tmp_path):
    """Bi-encoder: 1 / grad_compensation_ref_world (GC-DPR's 8; null: 1); reader: 1 / processes (DPR's DDP mean);
    both divided by the accumulation steps."""
    gc = BiEncoderTrainer(config(data, tmp_path / "a", train__gradient_accumulation_steps=2))
    assert gc.backward_weight == pytest.approx(1 / 16)
    plain = BiEncoderTrainer(config(data, tmp_path / "b", train__grad_compensation_ref_world="null"))
    assert plain.backward_weight == 1.0


def test_an_unwritable_output_dir_fails_at_the_start(data, tmp_path, monkeypatch):
    """Not after a whole epoch, at the first save: nothing is read before the check."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setattr("dpr.training.biencoder_trainer.load_datasets", lambda *a: pytest.fail("data was read"))
    with pytest.raises(UnwritableDirectoryError, match=rf"output_dir={blocker}/out is not a folder this process can write"):
        BiEncoderTrainer(config(data, blocker / "out"))


def state_of_size(values: int) -> CheckpointState:
    return CheckpointState(model_dict={"w": torch.zeros(values)}, optimizer_dict=None, scheduler_dict=None, offset=0,
                           epoch=0, encoder_params={"do_lower_case": True, "encoder": {}})


def test_a_full_disk_during_a_save_names_the_file_and_the_cause(tmp_path, monkeypatch):
    older = checkpoints.save_checkpoint(str(tmp_path / "dpr_biencoder.0"), state_of_size(10))
    before = pathlib.Path(older).read_bytes()

    def disk_full(obj, f):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 1792 vs 1686")

    monkeypatch.setattr(torch, "save", disk_full)
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda path: SimpleNamespace(total=10**9, used=10**9, free=2**20))
    target = str(tmp_path / "dpr_biencoder.1")
    with pytest.raises(CheckpointWriteError) as error:
        checkpoints.save_checkpoint(target, state_of_size(2**20))  # 4 MB of float32
    message = str(error.value)
    assert message.startswith(f"could not write checkpoint {target}: no space left on device (1 MB free in {tmp_path}")
    assert "needs about 4 MB" in message and "older checkpoints are intact" in message
    assert pathlib.Path(older).read_bytes() == before and os.listdir(tmp_path) == ["dpr_biencoder.0"]


def test_a_failed_write_with_space_left_reports_torchs_cause(tmp_path, monkeypatch):
    def fails(obj, f):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(torch, "save", fails)
    with pytest.raises(CheckpointWriteError, match=r"dpr_biencoder.0: \[Errno 5\] Input/output error \(\d+ MB free"):
        checkpoints.save_checkpoint(str(tmp_path / "dpr_biencoder.0"), state_of_size(10))


def test_stale_temporaries_of_this_runs_checkpoints_are_removed_at_start(data, tmp_path):
    tmp_path.mkdir(exist_ok=True)
    stale = [tmp_path / ".dpr_biencoder.0.k2j4h1.tmp", tmp_path / ".dpr_biencoder.3.120.abcdef.tmp"]
    for path in stale:
        path.write_bytes(b"x" * 1000)
    others = [tmp_path / ".dpr_extractive_reader.0.abc.tmp", tmp_path / "dpr_biencoder.notes.tmp"]
    for path in others:
        path.write_bytes(b"y")
    BiEncoderTrainer(config(data, tmp_path))
    assert not any(p.exists() for p in stale) and all(p.exists() for p in others)
    assert remove_stale_temporaries(tmp_path, "dpr_extractive_reader") == (1, 1)


def test_resume_passes_over_an_unreadable_newest_checkpoint(data, trained, tmp_path):
    output_dir = tmp_path / "out"
    shutil.copytree(trained, output_dir)
    newest = output_dir / "dpr_biencoder.0"
    newest.write_bytes(newest.read_bytes()[:1000])  # a killed copy
    trainer, run = run_trainer(config(data, output_dir))
    assert trainer.checkpoint_file == str(output_dir / "dpr_biencoder.0.2")
    assert [s.step for s in run.steps] == [3, 4]


def test_resume_stops_at_a_checkpoint_refused_for_what_it_holds(data, trained, tmp_path):
    output_dir = tmp_path / "out"
    shutil.copytree(trained, output_dir)
    torch.save({"model_dict": {}, "payload": pathlib.PurePosixPath("x")}, output_dir / "dpr_biencoder.1")
    with pytest.raises(CheckpointError, match=r"dpr_biencoder.1 holds pathlib.PurePosixPath.*trust_checkpoint=true"):
        BiEncoderTrainer(config(data, output_dir))


def test_no_readable_checkpoint_in_output_dir_is_an_error_not_a_fresh_start(data, tmp_path):
    (tmp_path / "dpr_biencoder.0").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* is readable .*dpr_biencoder.0.*set model_file"):
        BiEncoderTrainer(config(data, tmp_path))
