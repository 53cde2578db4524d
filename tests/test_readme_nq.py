"""The README's NQ section, run as written on a miniature NQ with DPR's file names served by a local mirror
(`$DPR_DOWNLOAD_MIRROR`, as the section says): the bash block itself is run by bash, from a fresh directory.

What differs from a real run is applied to each command's arguments by a stand-in for `python` and `torchrun`
(`SHIM`), as a user with a small machine would change them: a tiny BERT for bert-base-uncased (also where it is
the default: the reader's training; 512 positions), no fp16 (CPU), 1 epoch instead of 40 (bi-encoder) and 17 (reader), with the checkpoint names following, 2 embedding
shards instead of 50 (both run), 2 processes for torchrun's 8, 4 passages per question in reader training
instead of 24 and 10 at inference instead of 100 (for time), and the torchrun form of the bi-encoder left out
(the README says to run one of the two forms). Everything else (keys, resource names, globs, paths) is the README's.
"""
import gzip
import json
import os
import re
import subprocess
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.tiny_models import tiny_bert_dir

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"

SHIM = r'''
import os, re, subprocess, sys

repo, model, log = os.environ["NQ_REPO"], os.environ["NQ_MODEL"], os.environ["NQ_COMMANDS"]
launcher, args = sys.argv[1], sys.argv[2:]
prefix = [sys.executable]
if launcher == "torchrun":
    assert args[:2] == ["--nproc_per_node", "8"], args
    prefix, args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], args[2:]
script = args[0]
if launcher == "torchrun" and script == "train_dense_encoder.py":
    sys.exit(0)  # the other form of step 2: one or the other


SMALLER = {"train.num_train_epochs=17": "train.num_train_epochs=1",
           "passages_per_question_predict=100": "passages_per_question_predict=10"}


def small(arg):
    arg = arg.replace("bert-base-uncased", model).replace("dpr_biencoder.39", "dpr_biencoder.0")
    return SMALLER.get(arg, arg.replace("dpr_extractive_reader.16", "dpr_extractive_reader.0"))


args = [small(arg) for arg in args[1:] if arg not in ("--fp16", "fp16=true")]
if "--num_train_epochs" in args:
    args[args.index("--num_train_epochs") + 1] = "1"
if script == "train_reader.py" and not any(arg.startswith("model_file=") for arg in args):
    # the reader's default encoder is bert-base-uncased; 4 passages per question instead of 24 (for time)
    args += [f"encoder.pretrained_model_cfg={model}", "passages_per_question=4"]
runs = [args]
if "num_shards=50" in args:
    runs = [[{"num_shards=50": "num_shards=2", "shard_id=0": f"shard_id={shard}"}.get(a, a) for a in args]
            for shard in (0, 1)]
for run in runs:
    with open(log, "a") as out:
        out.write(" ".join([launcher, script, *run]) + "\n")
    code = subprocess.run([*prefix, os.path.join(repo, script), *run]).returncode
    if code:
        sys.exit(code)
'''

PRELUDE = """set -euo pipefail
python() { "$NQ_PYTHON" "$NQ_SHIM" python "$@"; }
torchrun() { "$NQ_PYTHON" "$NQ_SHIM" torchrun "$@"; }
"""


def nq_block() -> str:
    section = (REPO / "README.md").read_text().split("## The NQ pipeline", 1)[1]
    return section.split("```bash\n", 1)[1].split("\n```", 1)[0]


def write_mirror(root: Path) -> None:
    """DPR's remote layout, each file from data/sample (a miniature NQ: 100 passages, 160 + 40 questions)."""
    files = {
        "wikipedia_split/psgs_w100.tsv.gz": gzip.compress((SAMPLE / "psgs.tsv").read_bytes()),
        "data/retriever/biencoder-nq-train.json.gz": gzip.compress((SAMPLE / "biencoder-train.json").read_bytes()),
        "data/retriever/biencoder-nq-adv-hn-train.json.gz": gzip.compress(
            (SAMPLE / "biencoder-train.json").read_bytes()),
        "data/retriever/biencoder-nq-dev.json.gz": gzip.compress((SAMPLE / "biencoder-dev.json").read_bytes()),
        "data/retriever/nq-train.qa.csv": (SAMPLE / "train.qa.csv").read_bytes(),
        "data/retriever/nq-dev.qa.csv": (SAMPLE / "dev.qa.csv").read_bytes(),
        "data/retriever/nq-test.qa.csv": (SAMPLE / "dev.qa.csv").read_bytes(),
        "nq_license/LICENSE": b"CC BY-SA 3.0\n",
        "nq_license/README": b"Natural Questions licence note\n",
    }
    for relative_path, content in files.items():
        (root / relative_path).parent.mkdir(parents=True, exist_ok=True)
        (root / relative_path).write_bytes(content)


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def mirror(tmp_path):
    root = tmp_path / "mirror"
    write_mirror(root)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def test_the_readme_nq_commands_run_as_written_on_a_miniature_nq(mirror, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "shim.py").write_text(SHIM)
    (tmp_path / "nq.sh").write_text(PRELUDE + nq_block() + "\n")
    env = dict(os.environ, NQ_REPO=str(REPO), NQ_PYTHON=sys.executable, NQ_SHIM=str(tmp_path / "shim.py"),
               NQ_MODEL=tiny_bert_dir(tmp_path / "bert", max_positions=512), NQ_COMMANDS=str(tmp_path / "commands"),
               DPR_DOWNLOAD_MIRROR=mirror, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for variable in ("DPR_DATA_DIR", "HYDRA_FULL_ERROR"):
        env.pop(variable, None)
    result = subprocess.run(["bash", str(tmp_path / "nq.sh")], cwd=work, env=env, capture_output=True, text=True,
                            timeout=900)
    commands = (tmp_path / "commands").read_text().splitlines()
    assert result.returncode == 0, "\n".join(commands[-1:]) + "\n" + result.stderr[-4000:]
    assert [command.split()[1] for command in commands] == [
        "data/download_data.py", "data/download_data.py", "data/download_data.py", "train_dense_encoder.py",
        "generate_dense_embeddings.py", "generate_dense_embeddings.py", "dense_retriever.py", "dense_retriever.py",
        "dense_retriever.py", "preprocess_reader_data.py", "preprocess_reader_data.py", "train_reader.py",
        "train_reader.py"]
    downloads = work / "downloads" / "data" / "retriever"
    assert sorted(path.name for path in downloads.iterdir()) == [
        "LICENSE", "README", "nq-adv-hn-train.json", "nq-dev.json", "nq-train.json", "qas"]
    assert json.loads((downloads / "nq-dev.json").read_text()) == json.loads((SAMPLE / "biencoder-dev.json").read_text())
    for split, questions in (("test", 40), ("train", 160), ("dev", 40)):
        records = json.loads((work / "results" / f"nq_{split}.json").read_text())
        assert len(records) == questions and len(records[0]["ctxs"]) == 100
    assert (work / "runs" / "reader" / "dpr_extractive_reader.0").is_file()
    predictions = json.loads((work / "results" / "nq_dev_predictions.json").read_text())
    assert len(predictions) == 40
    assert sorted({entry["top_k"] for record in predictions for entry in record["predictions"]}) == [
        10, 20, 40, 50, 80, 100]
    assert re.search(r"n=100\tEM \d+\.\d\d", result.stdout + result.stderr)  # the README's "n=50	EM ..." line
