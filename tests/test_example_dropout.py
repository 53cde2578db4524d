"""Per-example dropout masks: a pure function of (example seed, call, canonical index), so the same in any batch,
at any padding and on replay."""
from fractions import Fraction

import pytest
import torch

from dpr.models.example_dropout import GOLDEN, example_dropout, example_seeds

SEEDS = [11, 7, 3, 2**62 + 5]
HIDDEN, ATTENTION = ((9, 3), (1,)), ((2, 11, 11), (2, 3))  # (row shape, sequence dims) of the two dropout kinds


def masks(seeds, shape, sequence_dims=(1,), max_length=16, p=0.5):
    """The outputs of two dropout calls on ones: 0 where dropped, 1/(1-p) where kept."""
    x = torch.ones((len(seeds),) + shape)
    with example_seeds(seeds, x.device, max_length):
        first = example_dropout(x, p, True, sequence_dims)
        second = example_dropout(x, p, True, sequence_dims)
    return first, second


def cut(tensor, width, sequence_dims):
    return tensor[tuple(slice(0, width) if d in sequence_dims else slice(None) for d in range(tensor.dim()))]


@pytest.mark.parametrize("shape,sequence_dims", [HIDDEN, ATTENTION])
def test_every_row_of_a_batch_has_the_mask_it_has_alone(shape, sequence_dims):
    in_batch = masks(SEEDS, shape, sequence_dims)
    for row, seed in enumerate(SEEDS):
        alone = masks([seed], shape, sequence_dims)
        for batch_call, alone_call in zip(in_batch, alone):
            assert torch.equal(batch_call[row], alone_call[0])


@pytest.mark.parametrize("shape,sequence_dims", [HIDDEN, ATTENTION])
def test_padding_to_another_width_changes_no_mask(shape, sequence_dims):
    widest = masks(SEEDS, tuple(16 if d + 1 in sequence_dims else n for d, n in enumerate(shape)), sequence_dims)
    for width in (1, 5, 9):
        narrow = masks(SEEDS, tuple(width if d + 1 in sequence_dims else n for d, n in enumerate(shape)), sequence_dims)
        for wide_call, narrow_call in zip(widest, narrow):
            assert torch.equal(cut(wide_call, width, sequence_dims), narrow_call)


def test_masks_differ_between_seeds_and_calls_and_replay_exactly():
    first, second = masks([1, 2], (8, 4))
    assert not torch.equal(first[0], first[1]) and not torch.equal(first, second)
    again, again_second = masks([1, 2], (8, 4))
    assert torch.equal(first, again) and torch.equal(second, again_second)
    assert set(first.unique().tolist()) == {0.0, 2.0}


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_rate_is_one_minus_p_and_neighbouring_seeds_are_independent(p):
    first, second = masks([0, 1], (12, 64, 64), sequence_dims=(2, 3), max_length=64, p=p)
    kept_first, kept_second = first > 0, second > 0
    n = kept_first[0].numel()
    sigma = (n * p * (1 - p)) ** 0.5
    for kept in (kept_first[0], kept_first[1], kept_second[0]):
        assert abs(int(kept.sum()) - n * (1 - p)) < 5 * sigma
    # independent masks agree where both keep or both drop: (1-p)^2 + p^2 of the elements
    for a, b in ((kept_first[0], kept_first[1]), (kept_first[0], kept_second[0])):
        agree = (1 - p) ** 2 + p**2
        assert abs(int((a == b).sum()) - n * agree) < 5 * (n * agree * (1 - agree)) ** 0.5


def reference_keep(seed: int, call: int, canonical_index: int, p: float) -> bool:
    """The module's definition in Python integers."""
    def mix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        return ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64

    key = mix((seed + GOLDEN) % 2**64)
    h = mix((key + ((call << 32) + canonical_index) * GOLDEN) % 2**64)
    return Fraction((h + 2**63) % 2**64, 2**64) >= Fraction(p)


def test_the_mask_is_the_documented_function_of_seed_call_and_canonical_index():
    max_length, p = 16, 0.3
    calls = masks(SEEDS, (2, 5, 7), sequence_dims=(2, 3), max_length=max_length, p=p)
    for call, mask in enumerate(calls):
        for (row, head, i, j), value in zip(torch.cartesian_prod(*[torch.arange(n) for n in mask.shape]).tolist(),
                                            mask.flatten().tolist()):
            index = (head * max_length + i) * max_length + j
            assert (value > 0) == reference_keep(SEEDS[row], call, index, p)


def test_a_sequence_longer_than_max_length_is_refused():
    with pytest.raises(RuntimeError, match="longer than max_length"):
        masks([1], (17, 3), max_length=16)


def test_outside_the_context_dropout_is_standard():
    x = torch.ones(4, 6)
    assert torch.equal(example_dropout(x, 0.5, training=False), x)
    torch.manual_seed(0)
    a = example_dropout(x, 0.5, True)
    torch.manual_seed(0)
    assert torch.equal(a, torch.nn.functional.dropout(x, 0.5, True))
