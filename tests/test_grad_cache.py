"""The gradient cache gives the gradients of one full-batch backward (dropout on), for any chunking."""
import pytest
import torch

from dpr.data.biencoder_batch import make_biencoder_batch
from dpr.models.biencoder import nll_loss
from dpr.training.grad_cache import GradCache, RandState, Tower, full_batch_step
from tests.biencoder_helpers import (assert_same_gradients, false_negative_mask, gradients, make_model, run, tiny_setup,
                                     towers)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("gc"))


CHUNKINGS = [(1, 1), (2, 3), (4, 5), (3, 6), (16, 32)]


@pytest.mark.parametrize("q_chunk,ctx_chunk,hard,other,mode", [
    *[(q, c, hard, other, "all") for q, c in CHUNKINGS for hard, other in [(1, 0), (2, 1)]],
    # in-batch false negatives masked: the same mask whatever the chunks (dpr/training/false_negatives.py)
    *[(q, c, 2, 1, mode) for q, c in [(1, 1), (4, 5)] for mode in ("mask_duplicates", "mask_answers")],
])
def test_cached_gradients_equal_full_batch_gradients(setup, q_chunk, ctx_chunk, hard, other, mode):
    model_dir, samples, tensorizer = setup
    model = make_model(model_dir)
    batch = make_biencoder_batch(samples, range(6), tensorizer, hard, other, shuffle=True, seed=3, epoch=1)
    masked = false_negative_mask(mode, samples, range(6), hard, other, seed=3, epoch=1)
    assert (masked is None) == (mode == "all") and (masked is None or masked.any())
    loss_full, correct_full, grads_full = run(model, batch, False, backward_weight=0.125, masked=masked)
    loss_gc, correct_gc, grads_gc = run(model, batch, True, q_chunk, ctx_chunk, backward_weight=0.125, masked=masked)
    assert loss_gc == pytest.approx(loss_full, rel=1e-5)
    assert correct_gc == correct_full
    assert_same_gradients(grads_full, grads_gc)


def test_dropout_is_active_in_these_comparisons(setup):
    """Without this, equal gradients could come from dropout being off."""
    model_dir, samples, tensorizer = setup
    model = make_model(model_dir)
    batch = make_biencoder_batch(samples, range(4), tensorizer, 1, 0, shuffle=True, seed=3, epoch=1)
    other = make_biencoder_batch(samples, range(4), tensorizer, 1, 0, shuffle=True, seed=4, epoch=1)
    with torch.no_grad():
        a = model.encode_questions(batch.question_ids, batch.question_mask, batch.question_seeds)
        b = model.encode_questions(other.question_ids, other.question_mask, other.question_seeds)
        model.eval()
        c = model.encode_questions(batch.question_ids, batch.question_mask)
    assert not torch.allclose(a, b) and not torch.allclose(a, c)


def test_fixed_context_encoder(setup):
    model_dir, samples, tensorizer = setup
    model = make_model(model_dir, fix_ctx=True)
    batch = make_biencoder_batch(samples, range(6), tensorizer, 1, 0, shuffle=True, seed=1)
    _, _, grads_full = run(model, batch, grad_cache=False)
    _, _, grads_gc = run(model, batch, True, 2, 3)
    assert not any(n.startswith("ctx_model.") for n in grads_gc)
    assert_same_gradients(grads_full, grads_gc)


def test_gradient_accumulation_over_batches(setup):
    """Two cached batches accumulate the same gradients as two full-batch backward passes."""
    model_dir, samples, tensorizer = setup
    model = make_model(model_dir)
    batches = [make_biencoder_batch(samples, idx, tensorizer, 1, 1, shuffle=True, seed=2) for idx in ([0, 1, 2], [3, 4, 5])]

    def accumulate(grad_cache):
        model.zero_grad(set_to_none=True)
        for batch in batches:
            t = towers(model, batch, 2, 3)
            loss_fn = lambda q, c, positive_indices: nll_loss(q, c, positive_indices)  # noqa: E731
            if grad_cache:
                GradCache(loss_fn)(t, 0.5, positive_indices=batch.positive_indices)
            else:
                full_batch_step(t, loss_fn, 0.5, positive_indices=batch.positive_indices)
        return gradients(model)

    assert_same_gradients(accumulate(False), accumulate(True))


def test_replayed_chunk_matches_first_pass_with_standard_dropout(setup):
    """Without per-example seeds, the recorded random state makes pass 2 reproduce pass 1 (GC-DPR #12)."""
    model_dir, samples, tensorizer = setup
    model = make_model(model_dir)
    batch = make_biencoder_batch(samples, range(4), tensorizer, 1, 0, shuffle=False)
    state = RandState.capture({"x": batch.question_ids})
    with torch.no_grad():
        first = model.encode_questions(batch.question_ids, batch.question_mask)
        different = model.encode_questions(batch.question_ids, batch.question_mask)
    with state.restored():
        replay = model.encode_questions(batch.question_ids, batch.question_mask)
    assert not torch.allclose(first, different)
    torch.testing.assert_close(replay.detach(), first, rtol=0, atol=1e-6)


def test_chunks_follow_length_order_and_results_come_back_in_input_order(setup):
    from dpr.training.grad_cache import split

    _, samples, tensorizer = setup
    batch = make_biencoder_batch(samples, range(6), tensorizer, 1, 0, shuffle=False)
    tower = Tower(lambda c: c["input_ids"].float().sum(1, keepdim=True),
                  {"input_ids": batch.context_ids, "attention_mask": batch.context_mask}, 4)
    chunks = split(tower)
    lengths = batch.context_mask.sum(1)
    widths = [c.inputs["input_ids"].shape[1] for c in chunks]
    assert widths == sorted(widths, reverse=True) and widths[0] == int(lengths.max())
    assert sorted(torch.cat([c.rows for c in chunks]).tolist()) == list(range(batch.context_ids.shape[0]))


def test_a_trainable_tower_the_loss_ignores_is_an_error(setup):
    """A zero gradient would silently leave that encoder untrained; a frozen tower is fine."""
    model_dir, samples, tensorizer = setup
    model = make_model(model_dir)
    batch = make_biencoder_batch(samples, range(4), tensorizer, 1, 0, shuffle=True, seed=1)

    def questions_only(q, ctx, positive_indices):
        return (q ** 2).mean(), 0

    with pytest.raises(ValueError, match="tower 1 is trainable but the loss does not depend on its representations"):
        GradCache(questions_only)(towers(model, batch, 2, 3), positive_indices=batch.positive_indices)
    frozen_ctx = towers(model, batch, 2, 3)
    frozen_ctx[1].requires_grad = False
    model.zero_grad(set_to_none=True)
    GradCache(questions_only)(frozen_ctx, positive_indices=batch.positive_indices)
    assert any(n.startswith("question_model.") for n in gradients(model))
    assert not any(n.startswith("ctx_model.") for n in gradients(model))
