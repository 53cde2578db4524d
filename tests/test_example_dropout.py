"""Per-example dropout masks: independent of the batch an example is in and of its padding."""
import torch

from dpr.models.example_dropout import example_dropout, example_seeds


def masks(seeds, shape, sequence_dims=(1,), max_length=16):
    x = torch.ones((len(seeds),) + shape)
    with example_seeds(seeds, x.device, max_length):
        first = example_dropout(x, 0.5, True, sequence_dims)
        second = example_dropout(x, 0.5, True, sequence_dims)
    return first, second


def test_same_mask_alone_or_in_a_batch_and_at_any_padding():
    alone, _ = masks([7], (5, 3))
    in_batch, _ = masks([1, 7, 2], (9, 3))
    assert torch.equal(in_batch[1, :5], alone[0])
    attention_alone, _ = masks([7], (2, 5, 5), sequence_dims=(2, 3))
    attention_batch, _ = masks([3, 7], (2, 11, 11), sequence_dims=(2, 3))
    assert torch.equal(attention_batch[1, :, :5, :5], attention_alone[0])


def test_masks_differ_between_seeds_and_calls_and_replay_exactly():
    first, second = masks([1, 2], (8, 4))
    assert not torch.equal(first[0], first[1]) and not torch.equal(first, second)
    again, _ = masks([1, 2], (8, 4))
    assert torch.equal(first, again)
    kept = (first > 0).float().mean()
    assert 0.3 < kept < 0.7 and set(first.unique().tolist()) <= {0.0, 2.0}


def test_outside_the_context_dropout_is_standard():
    x = torch.ones(4, 6)
    assert torch.equal(example_dropout(x, 0.5, training=False), x)
    torch.manual_seed(0)
    a = example_dropout(x, 0.5, True)
    torch.manual_seed(0)
    assert torch.equal(a, torch.nn.functional.dropout(x, 0.5, True))
