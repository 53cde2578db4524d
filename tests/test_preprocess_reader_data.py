"""One reader preprocessing with one set of defaults: preprocess_reader_data.py is configured by an extension of
train_reader.py's configuration, so both tokenize alike by default (hydra's and GC-DPR's), and the script writes
the very samples train_reader.py makes on the fly from the same results JSON."""
import json
import sys

import numpy as np
import pytest

import preprocess_reader_data
from dpr.data.reader_data import SampleFileOptions, load_samples, sample_files
from dpr.options.legacy_flags import config_top_level_keys, translate_argv
from dpr.options.reader_flags import (PREPROCESSING_FLAGS, PREPROCESSING_GC_DEFAULTS, READER_FLAGS,
                                      READER_GC_DEFAULTS, gc_preprocessing_argv, rewrite_preprocessing_sys_argv)
from dpr.training.reader_trainer import ReaderTrainer
from tests.fixtures import retriever_results
from tests.tiny_models import tiny_bert_dir
from tests.training_helpers import CONF_DIR, compose_config

READER_CONFIG = "extractive_reader_train_cfg"
PREPROCESSING_CONFIG = "preprocess_reader_data"
PREPROCESSING_KEYS = config_top_level_keys(CONF_DIR, PREPROCESSING_CONFIG) + config_top_level_keys(CONF_DIR,
                                                                                                  READER_CONFIG)


def preprocessing_config(argv):
    overrides = translate_argv(gc_preprocessing_argv(argv), PREPROCESSING_FLAGS, PREPROCESSING_GC_DEFAULTS,
                               PREPROCESSING_KEYS)
    return compose_config(overrides, PREPROCESSING_CONFIG)


def test_defaults_are_train_readers():
    reader = SampleFileOptions.from_config(compose_config([], READER_CONFIG))
    assert SampleFileOptions.from_config(compose_config([], PREPROCESSING_CONFIG)) == reader
    assert reader.encoder.sequence_length == 256  # conf/encoder/hf_bert.yaml, for both


def test_gc_flags_give_both_scripts_gc_dprs_defaults():
    reader_keys = config_top_level_keys(CONF_DIR, READER_CONFIG)
    reader = compose_config(translate_argv(["--pretrained_model_cfg", "minilm"], READER_FLAGS, READER_GC_DEFAULTS,
                                           reader_keys), READER_CONFIG)
    preprocessing = preprocessing_config(["--retriever_results", "r.json", "--out_file", "out",
                                          "--pretrained_model_cfg", "minilm"])
    assert SampleFileOptions.from_config(preprocessing) == SampleFileOptions.from_config(reader)
    assert (preprocessing.encoder.sequence_length, preprocessing.do_lower_case) == (512, False)


@pytest.mark.parametrize("argv, train_gold, dev_gold", [
    (["--gold_passages", "g.json"], None, "g.json"),  # the README's spelling, for an evaluation set
    (["--gold_passages_src", "g.json", "--is_train_set"], "g.json", None),
    (["--gold_passages=g.json", "--gold_passages_src_dev", "d.json"], "g.json", "d.json"),
])
def test_gc_gold_flags_name_the_gold_file_of_the_set_preprocessed(argv, train_gold, dev_gold):
    cfg = preprocessing_config(["--retriever_results", "r.json", "--out_file", "out"] + argv)
    options = SampleFileOptions.from_config(cfg)
    assert (options.gold_passages_src, options.gold_passages_src_dev) == (train_gold, dev_gold)
    assert options.gold_passages(cfg.is_train_set) == (train_gold if cfg.is_train_set else dev_gold)


@pytest.mark.parametrize("argv, formats", [
    ([], ("pkl", "npz")), (["--output_format", "npz"], ("npz",)), (["--output_format", "both"], ("pkl", "npz")),
    (["--output_format=both"], ("pkl", "npz")), (["--output_format", "pkl", "npz"], ("pkl", "npz")),
])
def test_output_format_flag(argv, formats):
    cfg = preprocessing_config(["--retriever_results", "r.json", "--out_file", "out"] + argv)
    assert SampleFileOptions.from_config(cfg).formats == formats


def test_unknown_flag_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        rewrite_preprocessing_sys_argv(PREPROCESSING_KEYS, ["preprocess_reader_data.py", "--learning_rate", "1"])
    assert exit_info.value.code == 2 and "unknown option '--learning_rate'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("results")
    for name, n in (("train", 6), ("dev", 4)):
        (folder / f"{name}.json").write_text(json.dumps(retriever_results(n, 4)))
    return {"dir": folder, "model": tiny_bert_dir(folder / "bert")}


def run_script(monkeypatch, argv):
    monkeypatch.setattr(sys, "argv", ["preprocess_reader_data.py"] + argv)
    preprocess_reader_data.main()


def as_comparable(samples):
    return [(s.question, s.answers, [(group, p.id, p.score, p.has_answer, p.passage_offset, p.answers_spans,
                                      np.asarray(p.sequence_ids).tolist())
                                     for group in ("positive_passages", "negative_passages", "passages")
                                     for p in getattr(s, group)])
            for s in samples]


def test_script_writes_the_samples_train_reader_makes(results, tmp_path, monkeypatch):
    model, folder = results["model"], results["dir"]
    settings = [f"encoder.pretrained_model_cfg={model}", "encoder.sequence_length=40", "num_workers=1"]
    ReaderTrainer(compose_config(settings + [f"train_files={folder / 'train.json'}",
                                             f"dev_files={folder / 'dev.json'}", f"output_dir={tmp_path / 'run'}"],
                                 READER_CONFIG))
    for name, is_train in (("train", "true"), ("dev", "false")):
        run_script(monkeypatch, settings + [f"retriever_results={folder / f'{name}.json'}",
                                            f"out_file={tmp_path / name}", f"is_train_set={is_train}",
                                            f"hydra.run.dir={tmp_path / 'logs' / name}"])
        by_script = load_samples(sample_files([str(p) for p in tmp_path.glob(f"{name}.*")]))
        by_trainer = load_samples(sample_files([str(p) for p in folder.glob(f"{name}.*.*")]))
        assert by_script and as_comparable(by_script) == as_comparable(by_trainer)
        # the settings were used: passage texts are tokenized to at most encoder.sequence_length tokens
        assert max(len(p.sequence_ids) - p.passage_offset for s in by_script for p in s.all_passages()) == 40


def test_missing_results_is_one_line(monkeypatch, tmp_path):
    with pytest.raises(SystemExit, match="^error: retriever_results and out_file are required"):
        run_script(monkeypatch, [f"hydra.run.dir={tmp_path}"])
