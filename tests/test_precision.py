"""Mixed precision: fp16 loss scaling applied exactly once (cache or not), bf16 on CPU, clear refusals."""
import pytest
import torch

from dpr.data.biencoder_batch import make_biencoder_batch
from dpr.models.biencoder import nll_loss
from dpr.training.grad_cache import GradCache, full_batch_step
from dpr.foundation.errors import ConfigError
from dpr.foundation.precision import make_precision
from tests.biencoder_helpers import assert_same_gradients, gradients, make_model, tiny_setup, towers


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("precision"))


def test_fp16_on_cpu_is_refused_with_a_message():
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        make_precision(torch.device("cpu"), fp16=True)
    with pytest.raises(ConfigError, match="choose one"):
        make_precision(torch.device("cpu"), fp16=True, bf16=True)


def loss_fn(q, ctx, positive_indices):
    return nll_loss(q, ctx, positive_indices)


@pytest.mark.parametrize("grad_cache", [False, True])
def test_a_grad_scaler_scales_the_gradients_exactly_once(setup, grad_cache):
    model_dir, samples, tensorizer = setup
    model = make_model(model_dir)
    batch = make_biencoder_batch(samples, range(6), tensorizer, 1, 1, shuffle=True, seed=5)

    def step(scaler):
        model.zero_grad(set_to_none=True)
        t = towers(model, batch, 2, 3)
        if grad_cache:
            GradCache(loss_fn, grad_scaler=scaler)(t, 0.5, positive_indices=batch.positive_indices)
        else:
            full_batch_step(t, loss_fn, 0.5, grad_scaler=scaler, positive_indices=batch.positive_indices)
        return gradients(model)

    reference = step(None)
    scaled = step(torch.amp.GradScaler("cpu", init_scale=1024.0))
    assert_same_gradients({k: v * 1024.0 for k, v in reference.items()}, scaled)


def test_bf16_training_on_cpu_with_and_without_cache(setup):
    model_dir, samples, tensorizer = setup
    precision = make_precision(torch.device("cpu"), bf16=True)
    batch = make_biencoder_batch(samples, range(6), tensorizer, 1, 0, shuffle=True, seed=5)
    losses = []
    for grad_cache in (False, True):
        model = make_model(model_dir)
        t = towers(model, batch, 2, 3)
        if grad_cache:
            loss, _ = GradCache(loss_fn, precision.autocast)(t, positive_indices=batch.positive_indices)
        else:
            loss, _ = full_batch_step(t, loss_fn, autocast=precision.autocast, positive_indices=batch.positive_indices)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        losses.append(float(loss))
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)
