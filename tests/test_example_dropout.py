"""Per-example dropout masks: a pure function of (example seed, call, canonical index), so the same in any batch,
at any padding and on replay."""
from fractions import Fraction
from types import SimpleNamespace

import pytest
import torch
from torch._inductor.exc import InvalidCxxCompiler
from transformers import BertConfig

import dpr.models.example_dropout as example_dropout_module
from dpr.foundation.errors import ConfigError
from dpr.models.example_dropout import GOLDEN, compiled_draw_failure, example_dropout, example_seeds
from dpr.models.hf_encoder import encode, encoder_from_config
from dpr.training.biencoder_trainer import BiEncoderSettings
from tests.fixtures import write_retriever_json
from tests.tiny_models import tiny_bert_dir
from tests.training_helpers import compose_config, run_trainer, tiny_overrides

SEEDS = [11, 7, 3, 2**62 + 5]
HIDDEN, ATTENTION = ((9, 3), (1,)), ((2, 11, 11), (2, 3))  # (row shape, sequence dims) of the two dropout kinds


def masks(seeds, shape, sequence_dims=(1,), max_length=16, p=0.5, compiled=False):
    """The outputs of two dropout calls on ones: 0 where dropped, 1/(1-p) where kept."""
    x = torch.ones((len(seeds),) + shape)
    with example_seeds(seeds, x.device, max_length, compiled):
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


@pytest.mark.parametrize("compiled", [False, True])
def test_a_sequence_longer_than_max_length_is_refused(compiled):
    with pytest.raises(RuntimeError, match="longer than max_length"):
        masks([1], (17, 3), max_length=16, compiled=compiled)
    assert compiled_draw_failure() is None  # a bad input, not a kernel that fails to compile


def test_outside_the_context_dropout_is_standard():
    x = torch.ones(4, 6)
    assert torch.equal(example_dropout(x, 0.5, training=False), x)
    torch.manual_seed(0)
    a = example_dropout(x, 0.5, True)
    torch.manual_seed(0)
    assert torch.equal(a, torch.nn.functional.dropout(x, 0.5, True))


# ------------------------------------------------------------------ the compiled draw
ODD = [((9, 3), (1,)), ((3, 11, 13), (2, 3))]  # (row shape, sequence dims): hidden states, attention probabilities


def outputs_and_gradients(seeds, shape, sequence_dims, p, dtype, compiled):
    """Two dropout calls on random x and their replay (the block entered again with the same seeds), and the
    gradient of a weighted sum of all four outputs with respect to x."""
    x = torch.randn((len(seeds),) + shape, generator=torch.Generator().manual_seed(0)).to(dtype).requires_grad_()
    outputs = []
    for _ in range(2):
        with example_seeds(seeds, x.device, 16, compiled):
            outputs += [example_dropout(x, p, True, sequence_dims), example_dropout(x, p, True, sequence_dims)]
    weights = torch.rand(outputs[0].shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    sum(((o * weights * (i + 1)).sum() for i, o in enumerate(outputs))).backward()
    return outputs, x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_the_compiled_draw_gives_the_eager_masks_and_gradients_bit_for_bit(dtype, p):
    for shape, sequence_dims in ODD:
        eager, eager_grad = outputs_and_gradients(SEEDS, shape, sequence_dims, p, dtype, compiled=False)
        compiled, compiled_grad = outputs_and_gradients(SEEDS, shape, sequence_dims, p, dtype, compiled=True)
        assert compiled_draw_failure() is None
        assert compiled[0].dtype == dtype and not torch.equal(compiled[0], compiled[1])  # two calls, two masks
        for e, c in zip(eager, compiled):
            assert torch.equal(e, c)
        assert torch.equal(compiled[0], compiled[2]) and torch.equal(compiled[1], compiled[3])  # the replay
        assert torch.equal(eager_grad, compiled_grad)


def test_the_compiled_backward_keeps_nothing_of_the_inputs_size():
    x = (torch.rand(4, 3, 11, 13) + 0.5).requires_grad_()  # positive: y > 0 where kept
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with example_seeds(SEEDS, x.device, 16, compiled=True):
            y = example_dropout(x, 0.1, True, (2, 3))
    y.sum().backward()
    assert saved and max(t.numel() for t in saved) <= 13  # row starts, the threshold, a term per dimension
    assert torch.equal(x.grad, (y > 0) * (1 / 0.9))


def tiny_encoder(layers=2):
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    return encoder_from_config(config, dropout=0.1).train()


def test_a_bert_at_varying_widths_compiles_no_graph_after_its_first_step_and_equals_eager():
    from torch._dynamo.utils import counters

    model = tiny_encoder(layers=3)
    graphs = []
    for rows, width in ((4, 20), (3, 33), (5, 7), (2, 48), (4, 13)):
        ids = torch.randint(5, 64, (rows, width), generator=torch.Generator().manual_seed(width))
        mask = torch.ones_like(ids)
        results = []
        for compiled in (True, False):
            model.zero_grad(set_to_none=True)
            with example_seeds(list(range(rows)), ids.device, 48, compiled):
                pooled = encode(model, ids, mask)[1]
            pooled.square().sum().backward()
            results.append((pooled, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
        graphs.append(counters["stats"]["unique_graphs"])
        (compiled_pooled, compiled_grads), (eager_pooled, eager_grads) = results
        assert torch.equal(compiled_pooled, eager_pooled)
        assert compiled_grads.keys() == eager_grads.keys()
        assert all(torch.equal(compiled_grads[n], eager_grads[n]) for n in eager_grads)
    # every width, layer and call after the first step runs the graphs it compiled (one per dropout kind at most)
    assert graphs[1:] == [graphs[0]] * 4 and compiled_draw_failure() is None


def failing_compile(calls):
    def compile_(function, **options):
        def compiled(*args):
            calls.append(options)
            raise InvalidCxxCompiler()  # what inductor raises on a machine without a C++ compiler
        return compiled
    return compile_


@pytest.mark.parametrize("failure", ["compiler", "platform"])
def test_where_the_kernel_cannot_compile_the_eager_draw_gives_the_masks_and_the_reason_is_kept(monkeypatch, failure):
    calls = []
    monkeypatch.setattr(example_dropout_module, "_compiled", None)
    monkeypatch.setattr(example_dropout_module, "_compile_failure", None)
    if failure == "compiler":
        monkeypatch.setattr(torch, "compile", failing_compile(calls))
    else:
        monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    shape, sequence_dims = ODD[1]
    first = masks(SEEDS, shape, sequence_dims, compiled=True)
    again = masks(SEEDS, shape, sequence_dims, compiled=True)
    eager = masks(SEEDS, shape, sequence_dims, compiled=False)
    assert all(torch.equal(a, e) and torch.equal(b, e) for a, b, e in zip(first, again, eager))
    reason = compiled_draw_failure()
    assert reason is not None and ("C++ compiler" in reason if failure == "compiler" else "Python" in reason)
    assert len(calls) == (1 if failure == "compiler" else 0)  # tried once per process, not per call


@pytest.mark.parametrize("environment,override,expected", [
    (None, None, True), ("false", None, False), ("false", "true", True), ("true", "false", False)])
def test_compile_dropout_defaults_to_true_unless_the_environment_says_false(monkeypatch, environment, override,
                                                                           expected):
    if environment is None:
        monkeypatch.delenv("DPR_COMPILE_DROPOUT", raising=False)
    else:
        monkeypatch.setenv("DPR_COMPILE_DROPOUT", environment)
    overrides = [f"train.compile_dropout={override}"] if override else []
    assert BiEncoderSettings.from_config(compose_config(overrides)).compile_dropout is expected


@pytest.mark.parametrize("environment,override", [("maybe", None), (None, "yes")])
def test_a_compile_dropout_that_is_not_a_boolean_is_refused(monkeypatch, environment, override):
    monkeypatch.setenv("DPR_COMPILE_DROPOUT", environment or "true")
    overrides = [f"train.compile_dropout={override}"] if override else []
    with pytest.raises(ConfigError, match="train.compile_dropout=.* must be true or false"):
        BiEncoderSettings.from_config(compose_config(overrides))


def test_training_with_the_compiled_draw_equals_eager_training_and_the_cache_the_full_batch(tmp_path):
    """One optimizer step of batch 16, dropout on: the compiled draw trains exactly as the eager one (the same masks,
    so the same losses, gradient norms and weights, bit for bit), and with it the cached step equals the full batch."""
    model = tiny_bert_dir(tmp_path / "bert", dropout=0.1)
    train, dev = write_retriever_json(tmp_path / "train.json", 16), write_retriever_json(tmp_path / "dev.json", 4)
    runs = {"eager": {"train.compile_dropout": "false"}, "compiled": {"train.compile_dropout": "true"},
            "compiled_cached": {"train.compile_dropout": "true", "train.grad_cache": "true", "train.q_chunk_size": 2,
                                "train.ctx_chunk_size": 3}}
    results = {}
    for name, extra in runs.items():
        out = tmp_path / name
        cfg = compose_config(tiny_overrides(model, train, dev, str(out), train__warmup_steps=0, train__batch_size=16,
                                            train__learning_rate=2e-5, train__hard_negatives=2,
                                            train__other_negatives=1) + [f"{k}={v}" for k, v in extra.items()])
        trainer, run = run_trainer(cfg)
        assert trainer.model.compile_dropout is (name != "eager")
        results[name] = (run.steps, torch.load(out / "dpr_biencoder.0", weights_only=True)["model_dict"])
    assert compiled_draw_failure() is None
    (eager_steps, eager_model), (steps, model_dict), (cached_steps, cached_model) = results.values()
    assert len(steps) == len(cached_steps) == 1
    assert [(s.loss, s.grad_norm) for s in steps] == [(s.loss, s.grad_norm) for s in eager_steps]
    assert all(torch.equal(model_dict[k], eager_model[k]) for k in eager_model)
    assert cached_steps[0].loss == pytest.approx(steps[0].loss, rel=1e-5)
    assert cached_steps[0].grad_norm == pytest.approx(steps[0].grad_norm, rel=1e-4)
    for key, tensor in model_dict.items():
        torch.testing.assert_close(cached_model[key], tensor, rtol=0, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


@pytest.fixture
def fresh_compilation(monkeypatch):
    """This process as if it had never tried to compile the draw (restored after the test)."""
    monkeypatch.setattr(example_dropout_module, "_compiled", None)
    monkeypatch.setattr(example_dropout_module, "_compile_failure", None)


def stub_compile(monkeypatch, kernel_calls):
    """torch.compile replaced by one whose kernel is `kernel_calls(n, function, args)` for the n-th call."""
    counter = []

    def compile_(function, **options):
        def compiled(*args):
            counter.append(1)
            return kernel_calls(len(counter), function, args)
        return compiled
    monkeypatch.setattr(torch, "compile", compile_)


@pytest.mark.parametrize("config", [{"cache_size_limit": 8}, {}])
def test_a_torch_whose_dynamo_lacks_recompile_limit_still_draws(monkeypatch, fresh_compilation, config):
    """torch <= 2.6 calls the setting cache_size_limit (setup.py allows torch>=2.1); one with neither keeps its
    default. Either way the draw runs, compiled, with the eager masks."""
    old_config = SimpleNamespace(**config)
    monkeypatch.setattr(torch._dynamo, "config", old_config)
    stub_compile(monkeypatch, lambda n, function, args: function(*args))
    shape, sequence_dims = ODD[1]
    compiled = masks(SEEDS, shape, sequence_dims, compiled=True)
    assert compiled_draw_failure() is None
    assert all(torch.equal(c, e) for c, e in zip(compiled, masks(SEEDS, shape, sequence_dims, compiled=False)))
    assert vars(old_config) == ({"cache_size_limit": example_dropout_module.RECOMPILE_LIMIT} if config else {})


def test_a_failure_while_setting_up_the_compiler_draws_eagerly(monkeypatch, fresh_compilation):
    def compile_(function, **options):
        raise RuntimeError("this torch cannot compile")
    monkeypatch.setattr(torch, "compile", compile_)
    shape, sequence_dims = ODD[0]
    compiled = masks(SEEDS, shape, sequence_dims, compiled=True)
    assert all(torch.equal(c, e) for c, e in zip(compiled, masks(SEEDS, shape, sequence_dims, compiled=False)))
    assert "this torch cannot compile" in compiled_draw_failure()


def out_of_memory_wrapped_by_inductor():
    try:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    except torch.OutOfMemoryError as error:
        raise RuntimeError("compiled kernel failed") from error


@pytest.mark.parametrize("failure", [
    lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    lambda: MemoryError(),
    out_of_memory_wrapped_by_inductor,
    lambda: RuntimeError("CUDA error: an illegal memory access was encountered"),
], ids=["cuda_oom", "host_oom", "wrapped_oom", "device_error"])
def test_an_error_of_running_the_kernel_is_raised_not_taken_for_a_compilation_failure(monkeypatch, fresh_compilation,
                                                                                    failure):
    """Out of memory inside the kernel: the eager draw needs more memory, so switching to it for good with a
    warning that blames compilation would hide the cause and make it worse; the error is the caller's."""
    def kernel(n, function, args):
        error = failure()
        if error is not None:
            raise error
    stub_compile(monkeypatch, kernel)
    shape, sequence_dims = ODD[0]
    expected = (torch.OutOfMemoryError, MemoryError, RuntimeError)
    with pytest.raises(expected):
        masks(SEEDS, shape, sequence_dims, compiled=True)
    assert compiled_draw_failure() is None


def test_a_backward_that_fails_to_compile_falls_back_as_forward_does(monkeypatch, fresh_compilation):
    """Backward runs the compiled kernel again (a gradient of another dtype or layout can compile anew): where that
    fails to compile, it draws the same mask eagerly, as forward does, and the process draws eagerly from then on."""
    def kernel(n, function, args):
        if n > 4:  # the four forward calls compile; the first backward does not
            raise InvalidCxxCompiler()
        return function(*args)
    stub_compile(monkeypatch, kernel)
    shape, sequence_dims = ODD[1]
    compiled, compiled_grad = outputs_and_gradients(SEEDS, shape, sequence_dims, 0.5, torch.float32, compiled=True)
    assert "C++ compiler" in compiled_draw_failure()
    eager, eager_grad = outputs_and_gradients(SEEDS, shape, sequence_dims, 0.5, torch.float32, compiled=False)
    assert all(torch.equal(c, e) for c, e in zip(compiled, eager)) and torch.equal(compiled_grad, eager_grad)
