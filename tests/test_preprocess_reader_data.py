"""One reader preprocessing with one set of defaults: preprocess_reader_data.py is configured by an extension of
train_reader.py's configuration, so both tokenize alike by default (hydra's and GC-DPR's), and the script writes
the very samples train_reader.py makes on the fly from the same results JSON."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import preprocess_reader_data
from dpr.data.reader_data import (SampleFileOptions, cached_sample_files, load_samples, read_samples, sample_files,
                                  stale_samples_reason)
from dpr.options.legacy_flags import config_top_level_keys, translate_argv
from dpr.options.reader_flags import (PREPROCESSING_FLAGS, PREPROCESSING_GC_DEFAULTS, READER_FLAGS,
                                      READER_GC_DEFAULTS, gc_preprocessing_argv, rewrite_preprocessing_sys_argv)
from dpr.training.reader_trainer import ReaderTrainer
from tests.conftest import REPO_ROOT
from tests.fixtures import forbid_calls, retriever_results
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


# ------------------------------------------------------------------------------------ options, inputs, outputs
@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if the results JSON is read or a tokenizer loaded."""
    forbid_calls(monkeypatch, "dpr.data.reader_data.read_retriever_results", "dpr.data.reader_data.Tensorizer.for_spec")


@pytest.mark.parametrize("argv, message", [
    (["out_file=/proc/nope/reader"], "^error: out_file=/proc/nope/reader: its folder /proc/nope is not one"),
    (["out_file={tmp}"], "^error: out_file={tmp} is a folder, not a file"),
    (["retriever_results={tmp}/missing.json"], "^error: retriever_results={tmp}/missing.json does not exist"),
    (["retriever_results={tmp}"], "^error: retriever_results={tmp} is a folder"),
    (["gold_passages_src={tmp}/gold.json", "is_train_set=true"], "^error: gold_passages_src={tmp}/gold.json does "
                                                                 "not exist"),
    (["num_workers=0"], "^error: num_workers=0 must be at least 1"),
    (["num_workers=-2"], "^error: num_workers=-2 must be at least 1"),
    (["num_workers=two"], "^error: num_workers='two' must be a whole number"),
    (["sample_formats=[]"], r"^error: sample_formats=\[\] must name at least one of pkl, npz"),
    (["sample_formats=[npz,csv]"], r"^error: sample_formats=\['npz', 'csv'\]: csv is not one of pkl, npz"),
    (["is_train_set=maybe"], "^error: is_train_set='maybe' must be true or false"),
    (["do_lower_case=maybe"], "^error: do_lower_case='maybe' must be true or false"),
])
def test_a_mistaken_option_is_one_line_before_any_work(results, tmp_path, monkeypatch, no_work, argv, message):
    given = {"retriever_results": results["dir"] / "dev.json", "out_file": tmp_path / "reader" / "dev",
             "hydra.run.dir": tmp_path / "logs"}
    given.update(arg.format(tmp=tmp_path).split("=", 1) for arg in argv)
    with pytest.raises(SystemExit, match=message.format(tmp=tmp_path)):
        run_script(monkeypatch, [f"{key}={value}" for key, value in given.items()])


@pytest.mark.parametrize("content, message", [
    ([], "holds no retriever results"),
    ([{"question": "q?", "answers": "paris", "ctxs": []}], "record 0: answers must be a list of strings"),
    ([{"question": "q?", "answers": ["paris"], "ctxs": {"id": "1"}}], "record 0: ctxs must be a list of objects"),
    ([{"question": "q?", "answers": ["paris"], "ctxs": ["text"]}], "record 0: ctxs must be a list of objects"),
    ([{"question": "q?", "answers": ["paris"], "ctxs": [{"id": "1", "text": "paris", "has_answer": "false"}]}],
     r"record 0, ctxs\[0\]: has_answer must be true or false, found 'false'"),
])
def test_results_that_are_not_retriever_results_are_one_line(tmp_path, monkeypatch, content, message):
    """Answers given as a string were split into their characters, each found in most passages."""
    (tmp_path / "bad.json").write_text(json.dumps(content))
    with pytest.raises(SystemExit, match=f"^error: {tmp_path / 'bad.json'}: {message}"):
        run_script(monkeypatch, [f"retriever_results={tmp_path / 'bad.json'}", f"out_file={tmp_path / 'r'}",
                                 f"hydra.run.dir={tmp_path / 'logs'}", "encoder.pretrained_model_cfg=/nonexistent"])


def test_kill_at_random_points_never_leaves_a_partial_sample_file_and_a_rerun_writes_the_same(results, tmp_path):
    """`kill -9` of preprocess_reader_data.py at random moments: every file under a final name reads whole, the
    set is not taken for current, and the rerun writes what an uninterrupted run writes, without temporaries."""
    folder = results["dir"]
    settings = [f"encoder.pretrained_model_cfg={results['model']}", "encoder.sequence_length=40", "num_workers=2",
                f"retriever_results={folder / 'train.json'}", "is_train_set=true", f"hydra.run.dir={tmp_path / 'logs'}"]
    command = [sys.executable, str(REPO_ROOT / "preprocess_reader_data.py")] + settings
    expected = tmp_path / "expected"
    started = time.perf_counter()
    subprocess.run(command + [f"out_file={expected / 'train'}"], check=True, capture_output=True, timeout=300)
    duration = time.perf_counter() - started
    prefix = tmp_path / "out" / "train"
    options = SampleFileOptions.from_config(compose_config(settings[:3], PREPROCESSING_CONFIG))
    rng = random.Random(21)
    for _ in range(3):
        process = subprocess.Popen(command + [f"out_file={prefix}"], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(rng.uniform(0.2, 1.0) * duration)
        os.killpg(process.pid, signal.SIGKILL)  # the script and any process it started
        process.wait()
        for path in cached_sample_files(str(prefix), formats=("pkl", "npz")):
            read_samples(path)
        if process.returncode != 0 and cached_sample_files(str(prefix)):
            reason = stale_samples_reason(str(folder / "train.json"), str(prefix), True, options)
            assert reason is not None or as_comparable(load_samples(cached_sample_files(str(prefix)))) == \
                as_comparable(load_samples(cached_sample_files(str(expected / "train"))))
    subprocess.run(command + [f"out_file={prefix}"], check=True, capture_output=True, timeout=300)
    assert stale_samples_reason(str(folder / "train.json"), str(prefix), True, options) is None
    assert as_comparable(load_samples(cached_sample_files(str(prefix)))) == \
        as_comparable(load_samples(cached_sample_files(str(expected / "train"))))
    assert sorted(p.name for p in prefix.parent.iterdir()) == sorted(p.name for p in expected.iterdir())
