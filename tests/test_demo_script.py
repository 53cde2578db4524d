"""The quickstart scripts, checked cheaply (the runs themselves take minutes): scripts/demo.sh parses and every
command it runs is valid for its entry script's configuration; scripts/squad_open.py, with the entry scripts
stubbed out, builds valid commands and writes its report."""
import importlib.util
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from dpr.foundation.run_lock import OutputInUseError
from dpr.options.legacy_flags import config_top_level_keys, translate_argv
from dpr.options.reader_flags import PREPROCESSING_FLAGS, PREPROCESSING_GC_DEFAULTS, gc_preprocessing_argv

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "scripts" / "demo.sh"
SQUAD_OPEN = REPO / "scripts" / "squad_open.py"
HYDRA_CONFIGS = {
    "train_dense_encoder.py": "biencoder_train_cfg",
    "generate_dense_embeddings.py": "gen_embs",
    "dense_retriever.py": "dense_retriever",
    "train_reader.py": "extractive_reader_train_cfg",
    "preprocess_reader_data.py": "preprocess_reader_data",
    "mine_hard_negatives.py": "mine_hard_negatives",
}


def check_command(argv, run_dir):
    """The command's overrides (or flags) are accepted by its entry script's configuration, and the sample data
    it names exists."""
    assert argv[0] == "python"
    script, args = argv[1], argv[2:]
    assert (REPO / script).is_file(), script
    for arg in args:
        for path in re.findall(r"data/sample/[\w.\-]+", arg):
            assert (REPO / path).is_file(), path
    if script == "preprocess_reader_data.py":  # GC-DPR's flags, as the script rewrites them
        keys = config_top_level_keys(str(REPO / "conf"), "preprocess_reader_data") + config_top_level_keys(
            str(REPO / "conf"), "extractive_reader_train_cfg")
        args = translate_argv(gc_preprocessing_argv(args), PREPROCESSING_FLAGS, PREPROCESSING_GC_DEFAULTS, keys)
    # a multirun sweep (shard_id=0,1) composes as its first value
    overrides = [re.sub(r"^([\w.]+)=([^\[,]+),.*$", r"\1=\2", arg) for arg in args if arg != "-m"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(HYDRA_CONFIGS[script], overrides=overrides, return_hydra_config=True)
    hydra_dir = cfg.hydra.sweep.dir if "-m" in args else cfg.hydra.run.dir
    assert str(hydra_dir).startswith(str(run_dir)), "hydra's logs belong in the run directory"


def demo_commands(run_dir):
    """demo.sh's entry-script commands, each expanded by bash with the script's variables set."""
    text = DEMO.read_text().replace("\\\n", " ")
    variables = f"RUN={run_dir} SAMPLE=data/sample MODEL={run_dir}/biencoder/dpr_biencoder.0 BF16=false PYTHON=python"
    commands = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith('run "$PYTHON" '):
            words = line[len("run "):].split(" | ")[0]
            expanded = subprocess.run(["bash", "-c", f'{variables}; printf "%s\\0" {words}'],
                                      capture_output=True, text=True, check=True).stdout
            commands.append(expanded.rstrip("\0").split("\0"))
    return commands


def test_demo_script_syntax_and_usage():
    subprocess.run(["bash", "-n", str(DEMO)], check=True)
    usage = subprocess.run(["bash", str(DEMO), "--help"], capture_output=True, text=True, check=True).stdout
    assert "RUN_DIR" in usage and "make demo" in usage
    wrong = subprocess.run(["bash", str(DEMO), "a", "b"], capture_output=True, text=True)
    assert wrong.returncode == 2 and "usage" in wrong.stderr


def test_demo_commands_are_valid():
    commands = demo_commands("/tmp/demo-run")
    scripts = [argv[1] for argv in commands]
    assert scripts == ["train_dense_encoder.py", "generate_dense_embeddings.py", "dense_retriever.py",
                       "dense_retriever.py", "preprocess_reader_data.py", "preprocess_reader_data.py",
                       "train_reader.py"]
    for argv in commands:
        check_command(argv, "/tmp/demo-run")
    train = commands[0]
    assert "train.grad_cache=true" in train and "train.q_chunk_size=8" in train
    assert "num_shards=2" in commands[1]


@pytest.fixture
def squad_open():
    spec = importlib.util.spec_from_file_location("squad_open", SQUAD_OPEN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_squad_open_help():
    usage = subprocess.run([sys.executable, str(SQUAD_OPEN), "--help"], capture_output=True, text=True,
                           check=True).stdout
    for option in ("--data", "--epochs", "--max_train_questions", "--reader_train_questions", "--no_plot", "--recipe",
                   "--dry_run", "--pooling", "--similarity", "--temperature", "--share_encoders", "--reader_recipe"):
        assert option in usage
    assert "READER_TIME" not in usage and re.search(r"Wall time measured .* about \d", usage, re.S)


def test_squad_open_missing_data_and_matplotlib(squad_open, tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="squad_to_dpr.py"):
        squad_open.main(["--data", str(tmp_path)])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    with pytest.raises(SystemExit, match="pip install matplotlib"):
        squad_open.main(["--data", str(REPO / "data" / "sample"), "--run_dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists(), "the check comes before any work"


def test_squad_open_commands_and_report(squad_open, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    trained_dev = run_dir / "trained" / "dev.json"
    trained_dev.parent.mkdir(parents=True)
    ctxs = [{"id": str(i), "title": "t", "text": "x", "score": "1", "has_answer": i == 3} for i in range(10)]
    trained_dev.write_text(json.dumps([{"question": f"q{n}", "answers": ["a"], "ctxs": ctxs} for n in range(4)]))
    commands = []

    def fake_run(command, on_start):  # the entry scripts are tested elsewhere; here only their command lines
        commands.append(["python", *command[1:]])
        return 0

    monkeypatch.setattr(squad_open, "run_command", fake_run)
    monkeypatch.setattr(squad_open, "accuracy_by_k", lambda path: ([10.0 * (k > 1) + 50.0 for k in range(1, 101)], 7))
    monkeypatch.setattr(squad_open, "reader_exact_match", lambda path: ({1: 33.33, 5: 25.0}, 3))
    squad_open.main(["--data", str(REPO / "data" / "sample"), "--run_dir", str(run_dir), "--no_plot",
                     "--max_train_questions", "32", "--reader_dev_questions", "2", "--bf16", "false"])

    assert [argv[1] for argv in commands] == [
        "generate_dense_embeddings.py", "dense_retriever.py", "train_dense_encoder.py",
        "generate_dense_embeddings.py", "dense_retriever.py", "dense_retriever.py", "train_reader.py"]
    for argv in commands:
        check_command(argv, str(run_dir))
    assert "train.grad_cache=true" in commands[2]
    assert len(json.loads((run_dir / "data" / "biencoder-train.json").read_text())) == 32
    reader_dev = json.loads((run_dir / "reader" / "dev.json").read_text())
    assert len(reader_dev) == 2 and all(len(record["ctxs"]) == 5 for record in reader_dev)

    report = (run_dir / "squad_open.md").read_text()
    assert "| retriever | top-1 | top-5 | top-20 | top-50 | top-100 |" in report
    for name in ("BM25", "MiniLM, untrained", "MiniLM, DPR-trained", "hybrid (BM25 + DPR-trained)"):
        assert f"| {name} | 50.00 | 60.00 | 60.00 | 60.00 | 60.00 |" in report
    assert "on 3 dev questions (passages of the DPR-trained retriever): 33.33 from the top passage, 25.00 from the " \
           "top 5 passages." in report
    assert "'eval_top_docs=[1,5]'" in report
    assert "train bi-encoder (gradient cache)" in report and "python train_dense_encoder.py" in report


def test_squad_open_rerun_skips_the_finished_stages(squad_open, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    trained_dev = run_dir / "trained" / "dev.json"
    trained_dev.parent.mkdir(parents=True)
    trained_dev.write_text(json.dumps([{"question": "q", "answers": ["a"], "ctxs": []}]))
    checkpoint = run_dir / "biencoder" / "dpr_biencoder.0"
    reader_checkpoint = run_dir / "reader" / "model" / "dpr_extractive_reader.0"
    ran, calls, found_checkpoints = [], [], []

    def fake_run(command, on_start):
        ran.append(command[1])
        calls.append(command[1])
        if command[1] == "train_dense_encoder.py":
            found_checkpoints.append(checkpoint.is_file())
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            checkpoint.write_text("epoch 0")  # what an interrupted training leaves behind
        if command[1] == "train_reader.py":
            found_checkpoints.append(reader_checkpoint.is_file())
            reader_checkpoint.parent.mkdir(parents=True, exist_ok=True)
            reader_checkpoint.write_text("epoch 0")
        return 0 if len(calls) != 3 else 1  # the 3rd stage fails, once

    monkeypatch.setattr(squad_open, "run_command", fake_run)
    monkeypatch.setattr(squad_open, "accuracy_by_k", lambda path: ([50.0] * 100, 1))
    monkeypatch.setattr(squad_open, "reader_exact_match", lambda path: ({1: 10.0}, 1))
    argv = ["--data", str(REPO / "data" / "sample"), "--run_dir", str(run_dir), "--no_plot", "--bf16", "false"]
    with pytest.raises(SystemExit, match="failed"):
        squad_open.main(argv)
    assert ran == ["generate_dense_embeddings.py", "dense_retriever.py", "train_dense_encoder.py"]
    ran.clear()
    squad_open.main(argv)  # resumes at the failed stage, which finds its own checkpoint
    assert ran == ["train_dense_encoder.py", "generate_dense_embeddings.py", "dense_retriever.py",
                   "dense_retriever.py", "train_reader.py"]
    assert found_checkpoints == [False, True, False]
    ran.clear()
    squad_open.main(argv)
    assert ran == []  # everything done
    squad_open.main([*argv, "--reader_learning_rate", "2e-4"])
    assert ran == ["train_reader.py"]  # only the changed stage
    assert found_checkpoints[-1] is False  # a changed stage starts afresh, not from the earlier run's checkpoint
    timings = (run_dir / "squad_open.md").read_text().split("## Timings")[1]
    assert timings.count("| ") >= 8  # the skipped stages keep their recorded times
    ran.clear()
    squad_open.main([*argv, "--reader_learning_rate", "2e-4", "--reader_train_questions", "2"])
    assert ran == ["dense_retriever.py", "train_reader.py"]  # same commands, another question sample
    ran.clear()
    squad_open.main([*argv, "--reader_learning_rate", "2e-4", "--reader_train_questions", "2",
                     "--max_train_questions", "150"])  # 9 steps instead of 10: the same warmup, the same command
    assert ran[0] == "train_dense_encoder.py"  # another sample of training questions: trained again
    ran.clear()
    squad_open.main([*argv, "--learning_rate", "1e-4"])
    assert ran[0] == "train_dense_encoder.py" and found_checkpoints[-2:] == [False, False]
    ran.clear()
    squad_open.main([*argv, "--learning_rate", "1e-4", "--in_batch_negatives", "mask_answers"])
    assert ran[0] == "train_dense_encoder.py"  # another in-batch negatives mode: trained again


def full_recipe_data(tmp_path):
    """data/sample with a distractor collection beside it."""
    data = tmp_path / "data"
    shutil.copytree(REPO / "data" / "sample", data)
    shutil.copy(data / "psgs.tsv", data / "psgs_plus_wikitext2.tsv")
    return data


def test_squad_open_full_recipe_dry_run(squad_open, tmp_path, capsys):
    run_dir = tmp_path / "run"
    squad_open.main(["--recipe", "full", "--data", str(full_recipe_data(tmp_path)), "--run_dir", str(run_dir),
                     "--bf16", "false", "--dry_run"])
    commands = [shlex.split(line[2:]) for line in capsys.readouterr().out.splitlines() if line.startswith("+ ")]
    assert not run_dir.exists(), "a dry run writes nothing"
    embed_and_retrieve = ["generate_dense_embeddings.py", "dense_retriever.py"] * 2
    assert [argv[1] for argv in commands] == [
        *embed_and_retrieve, "train_dense_encoder.py", *embed_and_retrieve, "mine_hard_negatives.py",
        "train_dense_encoder.py", *embed_and_retrieve, "dense_retriever.py", "train_reader.py"]
    for argv in commands:
        check_command(argv, str(run_dir))
    first, second = (argv for argv in commands if argv[1] == "train_dense_encoder.py")
    for train in (first, second):  # DPR's batch under the gradient cache, MiniLM as it was pre-trained
        for arg in ("train.batch_size=128", "train.grad_cache=true", "train.q_chunk_size=32",
                    "train.ctx_chunk_size=16", "encoder.pooling=mean", "encoder.similarity=cosine",
                    "encoder.temperature=0.05", "encoder.share_encoders=true", "encoder=minilm"):
            assert arg in train
    assert not any(arg.startswith("model_file=") for arg in first)  # from the pretrained MiniLM
    assert f"train_datasets=[{run_dir}/data/biencoder-train.json]" in first
    mine = commands[9]
    assert f"model_file={run_dir}/biencoder/dpr_biencoder.1" in mine
    assert f"input_file={run_dir}/data/biencoder-train.json" in mine
    assert f"out_file={run_dir}/data/biencoder-train-mined.json" in mine
    assert f"train_datasets=[{run_dir}/data/biencoder-train-mined.json]" in second
    # the second round continues from the first model's weights, with a fresh optimizer and schedule
    for arg in (f"model_file={run_dir}/biencoder/dpr_biencoder.1", "ignore_checkpoint_offset=true",
                "ignore_checkpoint_optimizer=true", "ignore_checkpoint_lr=true", "train.learning_rate=5e-05"):
        assert arg in second
    retrievals = [argv for argv in commands if argv[1] == "dense_retriever.py"]
    collections = [next(arg for arg in argv if arg.startswith("ctx_datatsets=")) for argv in retrievals]
    assert [c.rsplit("/", 1)[1] for c in collections] == ["psgs.tsv]", "psgs_plus_wikitext2.tsv]"] * 3 + ["psgs.tsv]"]
    assert f"model_file={run_dir}/biencoder_hn/dpr_biencoder.1" in retrievals[-1], "the reader reads the final model's"
    reader = commands[-1]
    for arg in ("passages_per_question=3", "eval_top_docs=[1,20]", "train.learning_rate=0.0002"):
        assert arg in reader
    assert "train.num_train_epochs=2" in second and "train.num_train_epochs=2" in first
    squad_open.main(["--recipe", "full", "--data", str(full_recipe_data(tmp_path / "pretrained")), "--run_dir",
                     str(run_dir), "--bf16", "false", "--dry_run", "--hn_init", "pretrained"])
    commands = [shlex.split(line[2:]) for line in capsys.readouterr().out.splitlines() if line.startswith("+ ")]
    second = [argv for argv in commands if argv[1] == "train_dense_encoder.py"][1]
    assert not any(arg.startswith(("model_file=", "ignore_checkpoint")) for arg in second)


def test_squad_open_in_batch_negatives_ablation_dry_run(squad_open, tmp_path, capsys):
    """The ablation's commands (docs/quickstart.md): round 1 of the full recipe with each mode; `all`, the
    trainer's default, leaves the training command as it was."""
    from dpr.training.false_negatives import IN_BATCH_NEGATIVES

    assert squad_open.IN_BATCH_NEGATIVES == IN_BATCH_NEGATIVES  # the script's copy (it imports no torch)
    data = full_recipe_data(tmp_path)
    for mode in IN_BATCH_NEGATIVES:
        squad_open.main(["--recipe", "full", "--hard_negative_round", "false", "--in_batch_negatives", mode,
                         "--data", str(data), "--run_dir", str(tmp_path / mode), "--bf16", "false", "--dry_run"])
        commands = [shlex.split(line[2:]) for line in capsys.readouterr().out.splitlines() if line.startswith("+ ")]
        trainings = [argv for argv in commands if argv[1] == "train_dense_encoder.py"]
        assert len(trainings) == 1
        check_command(trainings[0], str(tmp_path / mode))
        masking = [arg for arg in trainings[0] if arg.startswith("train.in_batch_negatives=")]
        assert masking == ([] if mode == "all" else [f"train.in_batch_negatives={mode}"])


def test_squad_open_full_recipe_report(squad_open, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    final_dev = run_dir / "trained_hn" / "dev.json"
    final_dev.parent.mkdir(parents=True)
    ctxs = [{"id": str(i), "title": "t", "text": "x", "score": "1", "has_answer": i == 3} for i in range(20)]
    final_dev.write_text(json.dumps([{"question": f"q{n}", "answers": ["a"], "ctxs": ctxs} for n in range(4)]))
    def fake_run(command, on_start):
        if command[1] == "train_dense_encoder.py" and f"output_dir={run_dir / 'biencoder'}" in command:
            # the first round's records: two steps with in-batch false negatives masked
            (run_dir / "biencoder").mkdir(parents=True)
            (run_dir / "biencoder" / "training_records.jsonl").write_text("".join(
                json.dumps(r) + "\n" for r in ({"kind": "step", "step": 1, "masked_pairs": 10},
                                               {"kind": "validation", "step": 1},
                                               {"kind": "step", "step": 2, "masked_pairs": 21})))
        return 0

    monkeypatch.setattr(squad_open, "run_command", fake_run)
    files = []  # each results file read gets its own accuracy: a row shows which file it came from

    def accuracy_by_k(path):
        files.append(str(path.relative_to(run_dir)))
        return [float(len(files))] * 100, 7

    monkeypatch.setattr(squad_open, "accuracy_by_k", accuracy_by_k)
    monkeypatch.setattr(squad_open, "reader_exact_match", lambda path: ({1: 33.33, 10: 25.0}, 3))
    squad_open.main(["--recipe", "full", "--data", str(full_recipe_data(tmp_path)), "--run_dir", str(run_dir),
                     "--no_plot", "--bf16", "false", "--in_batch_negatives", "mask_duplicates"])

    assert files == [f"{model}/{name}" for collection in ("", ".psgs_plus_wikitext2")
                     for model, name in (("untrained", f"dev{collection}.bm25.json"),
                                         ("untrained", f"dev{collection}.json"), ("trained", f"dev{collection}.json"),
                                         ("trained", f"dev{collection}.hybrid.json"),
                                         ("trained_hn", f"dev{collection}.json"),
                                         ("trained_hn", f"dev{collection}.hybrid.json"))]
    report = (run_dir / "squad_open.md").read_text()
    rows = ["BM25", "MiniLM, untrained", "MiniLM, DPR-trained", "hybrid (BM25 + DPR-trained)",
            "MiniLM, DPR-trained on mined negatives", "hybrid (BM25 + trained on mined negatives)"]
    psgs_table, plus_table = report.split("### psgs.tsv")[1].split("### psgs_plus_wikitext2.tsv")
    for value, name in enumerate(rows, 1):
        assert f"| {name} | {value:.2f} | {value:.2f} |" in psgs_table
        assert f"| {name} | {value + 6:.2f} | {value + 6:.2f} |" in plus_table
    assert "Recipe: full. Encoder: MiniLM, mean pooling, cosine similarity at temperature 0.05, one shared tower" \
        in report
    assert "in-batch negatives: mask_duplicates (15.5 masked (question, passage) pairs per step of the first round)" \
        in report
    assert "Second round: up to 5 hard negatives per question mined with the first model from ranks 3-30" in report
    assert "33.33 from the top passage, 25.00 from the top 10 passages" in report
    for stage in ("mine hard negatives with the trained encoder", "train bi-encoder on mined hard negatives",
                  "retrieve dev (psgs_plus_wikitext2.tsv): encoder trained on mined negatives and hybrid"):
        assert f"| {stage} |" in report
    assert "python mine_hard_negatives.py" in report
    assert len(json.loads((run_dir / "reader" / "dev.json").read_text())) == 4  # all dev questions, as the recipe


def test_squad_open_explicit_options_win_over_the_recipe(squad_open):
    args = squad_open.parse_args(["--recipe", "full", "--batch_size", "64", "--pooling", "cls", "--hn_epochs", "1",
                                  "--reader_recipe", "short", "--reader_passages", "5"])
    assert (args.batch_size, args.pooling, args.epochs, args.hn_epochs) == (64, "cls", 2, 1)
    assert (args.reader_passages, args.reader_train_questions, args.similarity) == (5, 1200, "cosine")
    short = squad_open.parse_args([])
    assert (short.batch_size, short.pooling, short.share_encoders, short.hard_negative_round) == (16, "cls", False,
                                                                                                  False)


def test_squad_open_plot(squad_open, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "topk.png"
    curves = {"BM25": [50.0 + k / 10 for k in range(100)]}
    squad_open.plot_curves({"psgs.tsv": curves, "psgs_plus_wikitext2.tsv": curves}, 7, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_squad_open_subsets_keep_their_mtime_when_unchanged(squad_open, tmp_path):
    """Every run writes its question subsets again; an unchanged one must keep its mtime, or the reader's sample
    files made from it would be taken for stale and preprocessed again."""
    src, dst = REPO / "data" / "sample" / "biencoder-train.json", tmp_path / "subset.json"
    assert squad_open.subset_json(src, dst, 5, seed=1) == 5
    os.utime(dst, ns=(10**18, 10**18))
    squad_open.subset_json(src, dst, 5, seed=1)
    assert dst.stat().st_mtime_ns == 10**18
    squad_open.subset_json(src, dst, 4, seed=1)
    assert dst.stat().st_mtime_ns != 10**18 and len(json.loads(dst.read_text())) == 4


SHORT_RUN_STAGES = ["generate_dense_embeddings.py", "dense_retriever.py", "train_dense_encoder.py",
                    "generate_dense_embeddings.py", "dense_retriever.py", "dense_retriever.py", "train_reader.py"]


def stub_stages(squad_open, monkeypatch, run_dir):
    """The entry scripts stubbed out (list of the scripts run); the trainer writes its checkpoint, as a real one."""
    ran = []

    def fake_run(command, on_start):
        ran.append(command[1])
        if command[1] == "train_dense_encoder.py":
            checkpoint = run_dir / "biencoder" / "dpr_biencoder.0"
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            checkpoint.write_text("weights")
        return 0

    trained_dev = run_dir / "trained" / "dev.json"
    trained_dev.parent.mkdir(parents=True, exist_ok=True)
    trained_dev.write_text(json.dumps([{"question": "q", "answers": ["a"], "ctxs": []}]))
    monkeypatch.setattr(squad_open, "run_command", fake_run)
    monkeypatch.setattr(squad_open, "accuracy_by_k", lambda path: ([50.0] * 100, 1))
    monkeypatch.setattr(squad_open, "reader_exact_match", lambda path: ({1: 10.0}, 1))
    return ran


def test_squad_open_reruns_every_stage_from_the_first_that_reads_a_changed_file(squad_open, tmp_path, monkeypatch):
    data, run_dir = full_recipe_data(tmp_path), tmp_path / "run"
    ran = stub_stages(squad_open, monkeypatch, run_dir)
    argv = ["--data", str(data), "--run_dir", str(run_dir), "--no_plot", "--bf16", "false"]
    squad_open.main(argv)
    assert ran == SHORT_RUN_STAGES
    ran.clear()
    with open(data / "psgs.tsv", "a", encoding="utf-8") as psgs:  # read by the first stage
        psgs.write("999\tanother passage\tTitle\n")
    squad_open.main(argv)
    assert ran == SHORT_RUN_STAGES
    ran.clear()
    with open(data / "dev.qa.csv", "a", encoding="utf-8") as dev:  # read by the second
        dev.write("another question\t['answer']\n")
    squad_open.main(argv)
    assert ran == SHORT_RUN_STAGES[1:]
    ran.clear()
    (run_dir / "biencoder" / "dpr_biencoder.0").write_text("other weights")  # read by the stages of the trained model
    squad_open.main(argv)
    assert ran == SHORT_RUN_STAGES[3:]
    ran.clear()
    squad_open.main(argv)
    assert ran == []


@pytest.mark.parametrize("damage", [b"", b'{"name": "train', b"\xff\xfe", b"[]",
                                    b'{"command": "python x.py", "inputs": {}, "seconds": "12"}'])
def test_squad_open_damaged_stage_record_runs_that_stage_again(squad_open, tmp_path, monkeypatch, damage):
    run_dir = tmp_path / "run"
    ran = stub_stages(squad_open, monkeypatch, run_dir)
    argv = ["--data", str(REPO / "data" / "sample"), "--run_dir", str(run_dir), "--no_plot", "--bf16", "false"]
    squad_open.main(argv)
    (run_dir / "stages" / "02.json").write_bytes(damage)  # e.g. a 0-byte record of a killed run's write
    ran.clear()
    squad_open.main(argv)
    assert ran == SHORT_RUN_STAGES[2:]
    assert json.loads((run_dir / "stages" / "02.json").read_text())["seconds"] is not None


STUCK_STAGE = '''import os, subprocess, sys, time
from pathlib import Path
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # e.g. a data loader worker
Path(os.environ["STAGE_PIDS"]).write_text(f"{os.getpid()} {worker.pid}")
time.sleep(120)
'''
DRIVER = '''import importlib.util, sys
from pathlib import Path
from dpr.foundation.errors import user_errors_in_one_line
spec = importlib.util.spec_from_file_location("squad_open", sys.argv[1])
squad_open = importlib.util.module_from_spec(spec)
spec.loader.exec_module(squad_open)
squad_open.REPO = Path(sys.argv[2])  # where the entry scripts are found
try:
    with user_errors_in_one_line():
        squad_open.main(sys.argv[3:])
except KeyboardInterrupt:
    sys.exit("interrupted")
'''


def process_is_gone(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")  # a zombie has ended: only its exit status is left


def start_stuck_run(tmp_path, run_dir):
    """squad_open.py whose first stage (with a worker process of its own) never ends; returns the script's
    process and the pids of the stage and its worker once both run."""
    entry_scripts = tmp_path / "entry_scripts"
    entry_scripts.mkdir()
    for name in HYDRA_CONFIGS:
        (entry_scripts / name).write_text(STUCK_STAGE)
    (tmp_path / "driver.py").write_text(DRIVER)
    pids = tmp_path / "stage_pids"
    script = subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(SQUAD_OPEN), str(entry_scripts),
                               "--data", str(REPO / "data" / "sample"), "--run_dir", str(run_dir), "--no_plot",
                               "--bf16", "false"], env=dict(os.environ, STAGE_PIDS=str(pids)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              # as started from a terminal: a shell without job control (a CI job started with `&`)
                              # hands its background commands SIGINT ignored, and Python keeps it ignored
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not (pids.is_file() and len(pids.read_text().split()) == 2):
        assert script.poll() is None and time.monotonic() < deadline, script.stderr.read()
        time.sleep(0.05)
    return script, [int(pid) for pid in pids.read_text().split()]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_squad_open_ending_the_script_ends_its_stage(squad_open, tmp_path, signum):
    script, stage_pids = start_stuck_run(tmp_path, tmp_path / "run")
    try:
        script.send_signal(signum)
        try:
            code = script.wait(timeout=30)
        except subprocess.TimeoutExpired:
            script.kill()
            pytest.fail(f"squad_open.py did not end within 30 s of signal {signum.name}; its stderr:\n"
                        f"{script.communicate()[1][-3000:]}")
        assert code != 0
        deadline = time.monotonic() + 10
        while not all(process_is_gone(pid) for pid in stage_pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(process_is_gone(pid) for pid in stage_pids), "no orphan stage process is left"
    finally:
        script.kill()
        for pid in stage_pids:
            if not process_is_gone(pid):
                os.kill(pid, signal.SIGKILL)


def test_squad_open_one_run_per_run_dir(squad_open, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    script, stage_pids = start_stuck_run(tmp_path, run_dir)
    argv = ["--data", str(REPO / "data" / "sample"), "--run_dir", str(run_dir), "--no_plot", "--bf16", "false"]
    try:
        with pytest.raises(OutputInUseError, match=rf"in use by another run \(driver.py, pid {script.pid} on "
                                                   rf"{socket.gethostname()}\).*another --run_dir"):
            squad_open.main(argv)
        second = subprocess.run([sys.executable, str(SQUAD_OPEN), *argv], capture_output=True, text=True,
                                timeout=120)
        assert second.returncode == 1 and second.stderr.startswith("error: --run_dir")
        assert len(second.stderr.strip().splitlines()) == 1
    finally:
        script.kill()  # kill -9: its lock is taken over, and its stage ended
        script.wait()
    ran = stub_stages(squad_open, monkeypatch, run_dir)
    try:
        squad_open.main(argv)
        assert all(process_is_gone(pid) for pid in stage_pids), "the killed run's stage was ended"
    finally:
        for pid in stage_pids:
            if not process_is_gone(pid):
                os.kill(pid, signal.SIGKILL)
    assert ran[-1] == "train_reader.py" and (run_dir / "squad_open.md").is_file()


FAKE_STAGES_DRIVER = '''import glob, hashlib, importlib.util, json, re, sys, time
from pathlib import Path
spec = importlib.util.spec_from_file_location("squad_open", sys.argv[1])
squad_open = importlib.util.module_from_spec(spec)
spec.loader.exec_module(squad_open)


def digest_of_files(paths):
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def write_slowly(path, text):  # as a stage writes its outputs: a kill can leave half of one
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as out:
        out.write(text[: len(text) // 2])
        out.flush()
        time.sleep(0.01)
        out.write(text[len(text) // 2:])


def fake_stage(command, on_start):
    """Outputs that depend on the script and on the content of every file the command names: a stale or
    partial input shows in the report."""
    script, args = command[1], dict(arg.split("=", 1) for arg in command[2:] if "=" in arg)
    named = [name for key, value in args.items() if key not in ("out_file", "prediction_results_file")
             for name in re.split(r"[\\[\\],]", value) if name]
    inputs = sorted(path for name in named for path in glob.glob(name) if Path(path).is_file())
    digest = hashlib.sha256((script + digest_of_files(inputs)).encode()).hexdigest()
    time.sleep(0.02)
    if script == "generate_dense_embeddings.py":
        for shard in range(2):
            write_slowly(Path(args["out_file"] + f"_{shard}"), digest * 50)
    elif script == "train_dense_encoder.py":
        write_slowly(Path(args["output_dir"], "dpr_biencoder.0"), digest * 50)
    elif script == "train_reader.py":
        write_slowly(Path(args["prediction_results_file"]), digest * 50)
    else:
        out_file = Path(args["out_file"])
        names = args.get("retriever", "[dense]").strip("[]").split(",")
        for position, name in enumerate(names):
            path = out_file if position == 0 else out_file.with_name(f"{out_file.stem}.{name}{out_file.suffix}")
            results = [{"question": f"{name}{n}", "answers": [], "ctxs": [{"id": digest, "has_answer": False}]}
                       for n in range(4)]
            write_slowly(path, json.dumps(results))
    return 0


def number_of(path):
    return int(digest_of_files([path])[:6], 16) / 1000


squad_open.run_command = fake_stage
squad_open.accuracy_by_k = lambda path: ([number_of(path)] * 100, 4)
squad_open.reader_exact_match = lambda path: ({1: number_of(path)}, 4)
squad_open.main(sys.argv[2:])
'''


def test_squad_open_killed_runs_never_leave_a_partial_or_stale_file_to_a_rerun(tmp_path):
    """kill -9 at random points of runs into one run directory, then a rerun: its report is an uninterrupted
    run's (stages stubbed by fast ones whose outputs hash their inputs)."""
    (tmp_path / "driver.py").write_text(FAKE_STAGES_DRIVER)

    def run(run_dir, kill_after=None):
        command = [sys.executable, str(tmp_path / "driver.py"), str(SQUAD_OPEN), "--data",
                   str(REPO / "data" / "sample"), "--run_dir", str(run_dir), "--no_plot", "--bf16", "false",
                   "--max_train_questions", "40", "--reader_dev_questions", "3"]
        script = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            script.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            script.kill()
            script.wait()
            return None
        assert script.returncode == 0, script.stderr.read()
        report = (run_dir / "squad_open.md").read_text().replace(str(run_dir), "RUN_DIR")
        return report.split("\n", 1)[1].split("## Timings")[0] + report.split("## Commands")[1]  # not the times

    started = time.time()
    uninterrupted = run(tmp_path / "uninterrupted")
    stages_seconds = (tmp_path / "uninterrupted" / "stages" / "06.json").stat().st_mtime - started
    seed = int(started)
    rng = random.Random(seed)
    kill_points = sorted(rng.uniform(0.2, stages_seconds + 0.2) for _ in range(5))
    for kill_after in kill_points:
        run(tmp_path / "killed", kill_after)
    assert run(tmp_path / "killed") == uninterrupted, f"kill points {kill_points} (seed {seed})"


def test_squad_open_embeds_afresh_when_the_shards_change(squad_open, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    stub_stages(squad_open, monkeypatch, run_dir)
    argv = ["--data", str(REPO / "data" / "sample"), "--run_dir", str(run_dir), "--no_plot", "--bf16", "false"]
    squad_open.main([*argv, "--num_shards", "3"])
    stale_shard = run_dir / "untrained" / "embs" / "psgs_2"
    stale_shard.parent.mkdir(parents=True)
    stale_shard.write_text("a shard of the earlier run")  # what generate_dense_embeddings.py left
    squad_open.main([*argv, "--num_shards", "2"])
    assert not stale_shard.exists(), "retrieval's glob psgs_* would read it"


def test_squad_open_on_a_filesystem_without_locks_is_one_line(squad_open, tmp_path, monkeypatch):
    """NFS mounted with nolock or Lustre without -o flock refuse flock (ENOLCK, EOPNOTSUPP): was a traceback."""
    import errno

    from dpr.foundation import run_lock
    from dpr.foundation.run_lock import LocksUnsupportedError

    def flock(descriptor, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(run_lock.fcntl, "flock", flock)
    ran = stub_stages(squad_open, monkeypatch, tmp_path / "run")
    argv = ["--data", str(REPO / "data" / "sample"), "--run_dir", str(tmp_path / "run"), "--no_plot", "--bf16", "false"]
    with pytest.raises(LocksUnsupportedError, match=r"--run_dir=.* is on a filesystem without file locks"):
        squad_open.main(argv)
    assert ran == []
