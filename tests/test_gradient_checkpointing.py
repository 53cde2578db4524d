"""encoder.gradient_checkpointing: each layer's activations are recomputed in backward, and per-example dropout
redraws the forward's masks on recompute, so the gradients are those without checkpointing (float precision),
alone and under the gradient cache (where only the cache's second, gradient forward checkpoints)."""
import pytest
import torch

from dpr.data.biencoder_batch import make_biencoder_batch
from dpr.models.hf_encoder import enable_gradient_checkpointing
from tests.biencoder_helpers import assert_same_gradients, make_model, run, tiny_setup


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("ckpt"))


def checkpointed_model(model_dir):
    model = make_model(model_dir)
    for encoder in (model.question_model, model.ctx_model):
        enable_gradient_checkpointing(encoder)
    return model


def count_recomputes(model):
    """A counter of the layer forwards run with gradients on (a recompute in backward is one)."""
    calls = []
    for encoder in (model.question_model, model.ctx_model):
        for layer in encoder.encoder.layer:
            layer.attention.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    return calls


@pytest.mark.parametrize("grad_cache,chunks", [(False, (None, None)), (True, (2, 3)), (True, (4, 5))])
def test_checkpointed_gradients_equal_plain_gradients_with_per_example_dropout(setup, grad_cache, chunks):
    model_dir, samples, tensorizer = setup
    batch = make_biencoder_batch(samples, range(6), tensorizer, 1, 1, shuffle=True, seed=3, epoch=1)
    loss_plain, correct_plain, grads_plain = run(make_model(model_dir), batch, grad_cache, *chunks)
    model = checkpointed_model(model_dir)
    calls = count_recomputes(model)
    loss_ckpt, correct_ckpt, grads_ckpt = run(model, batch, grad_cache, *chunks)
    assert loss_ckpt == pytest.approx(loss_plain, rel=1e-6) and correct_ckpt == correct_plain
    assert_same_gradients(grads_plain, grads_ckpt, rtol=1e-5)
    # the layers did run again in backward: each layer's forward with gradients twice as often as without it
    plain_calls = count_recomputes(plain := make_model(model_dir))
    run(plain, batch, grad_cache, *chunks)
    assert sum(calls) == 2 * sum(plain_calls) > 0
    # the cache's first forward (no gradients) is not checkpointed: as many no-grad forwards as without it
    assert calls.count(False) == plain_calls.count(False)


def test_recompute_without_the_dropout_context_would_draw_other_masks(setup):
    """The comparison above can fail: with plain checkpointing (no replay of the per-example block) the recompute
    runs outside the seeds' block, with standard dropout: torch's check of the recomputed tensors refuses it, or
    the gradients differ."""
    model_dir, samples, tensorizer = setup
    batch = make_biencoder_batch(samples, range(6), tensorizer, 1, 1, shuffle=True, seed=3, epoch=1)
    _, _, grads_plain = run(make_model(model_dir), batch, False)
    model = make_model(model_dir)
    for encoder in (model.question_model, model.ctx_model):
        encoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises((AssertionError, torch.utils.checkpoint.CheckpointError)):
        _, _, grads_naive = run(model, batch, False)
        assert_same_gradients(grads_plain, grads_naive, rtol=1e-5)


def trainer_config(setup, tmp_path, value):
    from tests.fixtures import write_retriever_json
    from tests.training_helpers import compose_config, tiny_overrides

    model_dir = setup[0]
    train = write_retriever_json(tmp_path / "train.json", 8)
    return compose_config(tiny_overrides(model_dir, train, train, str(tmp_path / "out"),
                                         **{"encoder__gradient_checkpointing": value}))


def test_the_trainer_checkpoints_its_trained_layers_and_the_checkpoint_does_not_hold_the_setting(setup, tmp_path):
    from dpr.models.encoder_spec import EncoderSpec
    from tests.training_helpers import run_trainer

    trainer, _ = run_trainer(trainer_config(setup, tmp_path, "true"))
    layers = [layer for encoder in (trainer.model.question_model, trainer.model.ctx_model)
              for layer in encoder.encoder.layer]
    assert layers and all(layer.gradient_checkpointing for layer in layers)
    saved = torch.load(tmp_path / "out" / "dpr_biencoder.0", weights_only=True)["encoder_params"]
    assert "gradient_checkpointing" not in saved["encoder"]  # how it was computed, not what the model is
    assert EncoderSpec("m").with_checkpoint_params(saved).sequence_length == 48  # the spec still reads back


def test_a_value_other_than_true_or_false_is_refused_in_one_line(setup, tmp_path):
    from dpr.foundation.errors import ConfigError
    from dpr.training.biencoder_trainer import BiEncoderTrainer

    with pytest.raises(ConfigError, match=r"^encoder.gradient_checkpointing='maybe' must be true or false$"):
        BiEncoderTrainer(trainer_config(setup, tmp_path, "maybe"))
