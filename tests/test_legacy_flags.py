"""GC-DPR command lines map onto hydra overrides through one table."""
import pytest

from dpr.options.legacy_flags import (
    BIENCODER_FLAGS,
    BIENCODER_GC_DEFAULTS,
    LegacyFlagError,
    config_top_level_keys,
    translate_argv,
)
from tests.training_helpers import CONF_DIR, compose_config

KEYS = config_top_level_keys(CONF_DIR, "biencoder_train_cfg")


def translate(argv):
    return translate_argv(argv, BIENCODER_FLAGS, BIENCODER_GC_DEFAULTS, KEYS)


GC_RECIPE = (
    "--encoder_model_type hf_bert --pretrained_model_cfg bert-base-uncased --train_file data/nq-train*.json "
    "--dev_file data/nq-dev.json --output_dir out --batch_size 128 --sequence_length 256 --do_lower_case "
    "--learning_rate 2e-05 --warmup_steps 1237 --max_grad_norm 2.0 --num_train_epochs 40 --seed 12345 --fp16 "
    "--grad_cache --q_chunk_size 16 --ctx_chunk_size 8 --dev_batch_size 16 --val_av_rank_start_epoch 30 "
    "--global_loss_buf_sz 2097152 --val_av_rank_max_qs 1000"
).split()


def test_gc_recipe_maps_onto_every_key():
    cfg = compose_config(translate(GC_RECIPE))
    assert cfg.train_datasets == ["data/nq-train*.json"] and cfg.dev_datasets == ["data/nq-dev.json"]
    assert cfg.encoder.pretrained_model_cfg == "bert-base-uncased" and cfg.encoder.sequence_length == 256
    assert cfg.train.batch_size == 128 and cfg.train.learning_rate == 2e-5 and cfg.train.warmup_steps == 1237
    assert cfg.train.max_grad_norm == 2.0 and cfg.train.num_train_epochs == 40 and cfg.seed == 12345
    assert cfg.fp16 is True and cfg.do_lower_case is True
    assert cfg.train.grad_cache is True and cfg.train.q_chunk_size == 16 and cfg.train.ctx_chunk_size == 8
    assert cfg.val_av_rank_start_epoch == 30 and cfg.train.val_av_rank_max_qs == 1000 and cfg.train.dev_batch_size == 16


def test_gc_defaults_apply_to_legacy_command_lines_only():
    legacy = compose_config(translate(["--train_file", "x.json", "--output_dir", "o"]))
    assert legacy.seed == 0 and legacy.encoder.sequence_length == 512 and legacy.do_lower_case is False
    assert legacy.train.num_train_epochs == 3 and legacy.val_av_rank_start_epoch == 10000
    hydra_form = compose_config(translate(["train_datasets=[x.json]", "output_dir=o"]))
    assert hydra_form.seed == 12345 and hydra_form.encoder.sequence_length == 256 and hydra_form.do_lower_case is True


def test_mixed_forms_and_explicit_values_win_over_gc_defaults():
    cfg = compose_config(translate(["--batch_size=8", "seed=5", "train.learning_rate=3e-5", "--sequence_length", "64"]))
    assert cfg.train.batch_size == 8 and cfg.seed == 5 and cfg.train.learning_rate == 3e-5
    assert cfg.encoder.sequence_length == 64


@pytest.mark.parametrize("argv", [["--local_rank=1"], ["--local-rank=1"], ["--local_rank", "1"]])
def test_launcher_local_rank_spellings(argv):
    assert translate(argv) == ["local_rank=1"]


def test_dpr_style_overrides_behind_dashes():
    assert translate(["--train.batch_size=4", "--output_dir=o"]) == [
        f"{k}={v}" for k, v in BIENCODER_GC_DEFAULTS.items()] + ["train.batch_size=4", "output_dir='o'"]
    assert translate(["--train.batch_size=4"]) == ["train.batch_size=4"]


def test_upsample_rates_and_quoting():
    out = translate(["--train_files_upsample_rates", "[1,2,1]", "--train_file", "it's/*.json"])
    assert "train_sampling_rates=[1,2,1]" in out and "train_datasets=['it\\'s/*.json']" in out
    cfg = compose_config(out)
    assert list(cfg.train_sampling_rates) == [1, 2, 1] and cfg.train_datasets == ["it's/*.json"]


def test_unknown_flag_lists_the_valid_ones():
    with pytest.raises(LegacyFlagError) as e:
        translate(["--batchsize", "4"])
    assert "unknown option '--batchsize'" in str(e.value.code) and "--batch_size" in str(e.value.code)


def test_hydra_options_pass_through():
    assert translate(["-m", "--cfg", "job", "seed=1"]) == ["-m", "--cfg", "job", "seed=1"]
