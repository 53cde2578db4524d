"""Every numeric option of every entry script (dpr/options/numeric_options.py): a value that cannot work ends the
script at its start in one line naming the key, before any work begins."""
import copy
import importlib
import math

import pytest
from omegaconf import OmegaConf

from dpr.options.numeric_options import NUMERIC_OPTIONS, Bound
from tests.fixtures import forbid_calls
from tests.training_helpers import compose_config

# entry script, its hydra main, the stage function it starts the work with, and its configuration
ENTRY_SCRIPTS = {
    "biencoder_train_cfg": ("train_dense_encoder", "main", "run_training"),
    "extractive_reader_train_cfg": ("train_reader", "main", "run_training"),
    "preprocess_reader_data": ("preprocess_reader_data", "preprocess", "run_preprocessing"),
    "gen_embs": ("generate_dense_embeddings", "main", "generate_dense_embeddings"),
    "dense_retriever": ("dense_retriever", "main", "run_dense_retriever"),
    "mine_hard_negatives": ("mine_hard_negatives", "main", "mine_hard_negatives"),
}
# set by the launchers (torchrun's LOCAL_RANK), not by the user
NOT_OPTIONS = {"local_rank"}
_configs = {}


def config(name):
    if name not in _configs:
        _configs[name] = compose_config([], name)
    return copy.deepcopy(_configs[name])


def bad_values(bound: Bound) -> list:
    below = bound.minimum if bound.above else (bound.minimum - 1 if bound.whole else bound.minimum - 0.5)
    values = [below, "abc"]
    if bound.maximum is not None:
        values.append(bound.maximum + 1)
    if bound.whole:
        values.append(bound.minimum + 0.5)  # not a whole number
    else:
        values.append(math.nan)
    if not bound.null:
        values.append(None)
    return [[value] if bound.each else value for value in values]


CASES = [pytest.param(name, bound, value, id=f"{name}:{bound.key}={value!r}")
         for name, bounds in NUMERIC_OPTIONS.items() for bound in bounds for value in bad_values(bound)]


@pytest.mark.parametrize("name, bound, value", CASES)
def test_a_value_that_cannot_work_is_one_line_before_any_work(monkeypatch, name, bound, value):
    module_name, main_name, stage = ENTRY_SCRIPTS[name]
    script = importlib.import_module(module_name)
    forbid_calls(monkeypatch, f"{module_name}.{stage}")
    cfg = config(name)
    OmegaConf.update(cfg, bound.key, value, merge=False)
    with pytest.raises(SystemExit) as stopped:
        getattr(script, main_name).__wrapped__(cfg)
    message = str(stopped.value.code)
    assert message.startswith(f"error: {bound.key}") and "\n" not in message, message


@pytest.mark.parametrize("name", sorted(NUMERIC_OPTIONS))
def test_the_defaults_pass_and_every_numeric_option_has_a_row(name):
    cfg = config(name)
    module_name, _, _ = ENTRY_SCRIPTS[name]
    importlib.import_module(module_name)  # the script exists under that name
    from dpr.options.numeric_options import check_numeric_options

    check_numeric_options(cfg, name)
    rows = {bound.key for bound in NUMERIC_OPTIONS[name]}
    container = OmegaConf.to_container(cfg, resolve=True)
    numeric = set()

    def walk(node, prefix):
        for key, value in node.items():
            if key in ("datasets", "ctx_sources"):
                continue
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                numeric.add(f"{prefix}{key}")
            elif isinstance(value, list) and value and all(isinstance(v, int) for v in value):
                numeric.add(f"{prefix}{key}")

    walk(container, "")
    assert sorted(numeric - rows - NOT_OPTIONS) == []


@pytest.mark.parametrize("good", [
    ("dense_retriever", "n_docs", 1), ("mine_hard_negatives", "n_docs", None), ("gen_embs", "num_workers", 0),
    ("biencoder_train_cfg", "train.max_grad_norm", None), ("biencoder_train_cfg", "train.peak_tflops", 312.0),
    ("extractive_reader_train_cfg", "eval_top_docs", [10, 20]), ("dense_retriever", "alpha", 1),
])
def test_values_at_the_bounds_pass(good):
    from dpr.options.numeric_options import check_numeric_options

    name, key, value = good
    cfg = config(name)
    OmegaConf.update(cfg, key, value, merge=False)
    check_numeric_options(cfg, name)
