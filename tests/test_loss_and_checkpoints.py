"""The NLL loss against a hand computation; checkpoint writing, reading and tolerant loading."""
import math
import os

import pytest
import torch

from dpr.models.biencoder import build_biencoder, nll_loss
from dpr.models.encoder_spec import EncoderSpec
from dpr.foundation import checkpoints
from dpr.foundation.checkpoints import CheckpointState
from dpr.training.optim import linear_schedule_factor
from tests.tiny_models import tiny_bert_dir


def test_nll_loss_hand_computed():
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    ctx = torch.tensor([[1.0, 1.0], [0.0, 1.0], [2.0, 0.0], [1.0, 0.0]])
    # question 0 scores [1, 0, 2, 1], positive 0; question 1 scores [2, 2, 0, 0], positive 2
    expected0 = -(1 - math.log(math.e + 1 + math.e**2 + math.e))
    expected1 = -(0 - math.log(2 * math.e**2 + 2))
    loss, correct = nll_loss(q, ctx, torch.tensor([0, 2]))
    assert float(loss) == pytest.approx((expected0 + expected1) / 2, rel=1e-6)
    assert correct == 0
    loss, correct = nll_loss(q, ctx, torch.tensor([2, 1]))
    assert correct == 1  # question 1's tie between 0 and 1 resolves to the first


def test_cosine_similarity_extension():
    q = torch.tensor([[3.0, 0.0]])
    ctx = torch.tensor([[1.0, 0.0], [0.0, 5.0]])
    loss, _ = nll_loss(q, ctx, torch.tensor([0]), similarity="cosine", temperature=0.5)
    assert float(loss) == pytest.approx(-(2 - math.log(math.exp(2) + 1)), rel=1e-6)


def test_schedule_warmup_then_linear_decay():
    assert linear_schedule_factor(0, 10, 110) == 0 and linear_schedule_factor(5, 10, 110) == 0.5
    assert linear_schedule_factor(60, 10, 110) == 0.5 and linear_schedule_factor(110, 10, 110) == pytest.approx(1e-7)


@pytest.fixture(scope="module")
def biencoder(tmp_path_factory):
    model_dir = tiny_bert_dir(tmp_path_factory.mktemp("bert") / "m")
    return build_biencoder(EncoderSpec(model_dir, sequence_length=32, dropout=0.1)), model_dir


def state_of(model, **kw):
    values = dict(optimizer_dict=None, scheduler_dict={"last_epoch": 3}, offset=0, epoch=1,
                  encoder_params={"do_lower_case": True, "encoder": {"sequence_length": 32}})
    values.update(kw)
    return CheckpointState(model_dict=model.state_dict(), **values)


def test_round_trip_with_weights_only(biencoder, tmp_path):
    model, _ = biencoder
    path = checkpoints.save_checkpoint(str(tmp_path / "dpr_biencoder.1"), state_of(model))
    raw = torch.load(path, weights_only=True)
    assert raw["encoder_params"]["encoder"] == {"sequence_length": 32}
    loaded = checkpoints.load_checkpoint(path)
    assert loaded.epoch == 1 and loaded.scheduler_dict == {"last_epoch": 3}
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.model_dict[k], v)


def test_a_crash_during_save_leaves_the_previous_checkpoint_intact(biencoder, tmp_path, monkeypatch):
    model, _ = biencoder
    path = str(tmp_path / "dpr_biencoder.0")
    checkpoints.save_checkpoint(path, state_of(model, epoch=0))
    before = open(path, "rb").read()

    def crash(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint(path, state_of(model, epoch=5))
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["dpr_biencoder.0"]


def test_names_and_latest(tmp_path):
    assert checkpoints.checkpoint_path("o", "dpr_biencoder", 3) == os.path.join("o", "dpr_biencoder.3")
    assert checkpoints.checkpoint_path("o", "dpr_biencoder", 3, 120) == os.path.join("o", "dpr_biencoder.3.120")
    for i, name in enumerate(["dpr_biencoder.0", "dpr_biencoder.1.5", "other.7", "dpr_biencoder.notes", "dpr_biencoder_v2.3"]):
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (1000 + i, 1000 + i))
    found = checkpoints.checkpoints_newest_first(str(tmp_path), "dpr_biencoder")
    assert found == [str(tmp_path / "dpr_biencoder.1.5"), str(tmp_path / "dpr_biencoder.0")]


def test_released_dpr_checkpoint_shape_loads(biencoder, tmp_path, caplog):
    caplog.set_level("INFO")
    """Old DPR files: flat encoder_params, embeddings.position_ids present, pooler weights present."""
    model, _ = biencoder
    model_dict = dict(model.state_dict())
    for prefix in ("question_model.", "ctx_model."):
        model_dict[prefix + "embeddings.position_ids"] = torch.arange(128).unsqueeze(0)
    raw = {"model_dict": model_dict, "optimizer_dict": None, "scheduler_dict": None, "offset": 0, "epoch": 39,
           "encoder_params": {"do_lower_case": True, "pretrained_model_cfg": "bert-base-uncased",
                              "encoder_model_type": "hf_bert", "pretrained_file": None, "projection_dim": 0,
                              "sequence_length": 256}}
    torch.save(raw, tmp_path / "hf_bert_base.cp")
    loaded = checkpoints.load_checkpoint(str(tmp_path / "hf_bert_base.cp"))
    assert loaded.encoder_params == {"do_lower_case": True, "encoder": {
        "pretrained_model_cfg": "bert-base-uncased", "encoder_model_type": "hf_bert", "pretrained_file": None,
        "projection_dim": 0, "sequence_length": 256}}
    checkpoints.load_model_state(model, loaded.model_dict)
    assert "dropped question_model.embeddings.position_ids" in caplog.text


def test_a_checkpoint_of_another_shape_is_a_clear_error(biencoder):
    model, _ = biencoder
    state = {k: v for k, v in model.state_dict().items() if "layer.1." not in k}
    with pytest.raises(RuntimeError, match="missing keys"):
        checkpoints.load_model_state(model, state)


def test_a_tensor_shared_by_two_keys_is_written_once(tmp_path):
    """save_checkpoint hands torch.save the state's own tensors (dataclasses.asdict would deep-copy them: twice
    the memory during a save, and shared storage written once per key)."""
    weights = torch.randn(64, 64)

    def saved_size(name, second):
        state = CheckpointState(model_dict={"a": weights, "b": second}, optimizer_dict=None, scheduler_dict=None,
                                offset=0, epoch=0, encoder_params={})
        return os.path.getsize(checkpoints.save_checkpoint(str(tmp_path / name), state))

    assert saved_size("shared", weights) < 0.6 * saved_size("copied", weights.clone())
