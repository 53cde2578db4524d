"""mine_hard_negatives: the mined negatives are the highest-ranked passages in the rank range that hold no answer and
are no positive, as the dense retriever ranks them; keep vs replace; questions without a negative keep their own;
the output trains."""
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from dpr.data.biencoder_data import load_biencoder_samples
from dpr.data.ctx_sources import CtxSource
from dpr.data.data_files import DataFileError
from dpr.evaluation.qa_validation import has_answer
from dpr.indexing.dense_retriever import run_dense_retriever
from dpr.indexing.generate_embeddings import generate_dense_embeddings
from dpr.foundation.errors import UserInputError
from dpr.foundation.files import OutputWriteError
from dpr.data.ctx_sources import strip_source_prefix
from dpr.indexing.hard_negatives import (Candidate, MiningConfigError, MiningOptions, hard_negative_ctxs,
                                         mine_hard_negatives, select_hard_negatives)
from tests.conftest import REPO_ROOT
from tests.fixtures import TOPICS, assert_same_but_float_noise, forbid_calls
from tests.retrieval_helpers import (
    SEQUENCE_LENGTH,
    gen_embs_config,
    passages,
    retriever_config,
    tiny_model,
    write_biencoder_checkpoint,
    write_passages_tsv,
)
from tests.tiny_models import tiny_bert_dir
from tests.training_helpers import compose_config, run_trainer, tiny_overrides

# A passage holding "paris" that is not Paris's positive: excluded for its answer, not for its id.
EXTRA_PASSAGE = ("24", "the eiffel tower stands in paris by the seine", "eiffel tower")
ALL_PASSAGES = passages() + [EXTRA_PASSAGE]
BM25_NEGATIVE = {"title": "bm25", "text": "a bm25 negative of the original file", "passage_id": "bm25-1"}


def training_records() -> list[dict]:
    """One record per capital (positive: its passage), plus the awkward ones: a positive without the answer string
    (excluded by its id), answers found in every passage, no answers, and no positive at all."""
    records = [{"question": f"what is the capital of {country}?", "answers": [city],
                "positive_ctxs": [{"title": city, "text": text, "passage_id": str(i + 1)}],
                "negative_ctxs": [], "hard_negative_ctxs": [BM25_NEGATIVE]}
               for i, (city, country, text) in enumerate(TOPICS)]
    records[1]["answers"] = ["the city on the spree"]  # nowhere verbatim: Berlin's passage 2 goes by its id
    everywhere = {"question": "what do all passages say?", "answers": ["the", "is", "a"],
                  "positive_ctxs": [{"title": "x", "text": "the end", "passage_id": "1"}],
                  "hard_negative_ctxs": [BM25_NEGATIVE]}
    no_answers = {"question": "what is unanswerable?", "answers": [],
                  "positive_ctxs": [{"title": "x", "text": "nothing", "passage_id": "3"}],
                  "hard_negative_ctxs": [BM25_NEGATIVE]}
    no_positive = {"question": "what has no positive?", "answers": ["rome"], "positive_ctxs": [],
                   "hard_negative_ctxs": [BM25_NEGATIVE]}
    return records + [everywhere, no_answers, no_positive]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny two-tower checkpoint, 24 passages embedded by it in 2 shards, the training file and a qas file of
    the same questions (for the retriever's own ranking)."""
    folder = tmp_path_factory.mktemp("mining")
    ctx_dir = tiny_model(folder / "ctx", seed=1)
    model = write_biencoder_checkpoint(folder / "cp", tiny_model(folder / "q", seed=0), ctx_dir)
    psgs = write_passages_tsv(folder / "psgs.tsv", ALL_PASSAGES)
    for shard_id in range(2):
        generate_dense_embeddings(gen_embs_config(ctx_dir, psgs, folder / "embs" / "psgs", model_file=model,
                                                  shard_id=shard_id, num_shards=2))
    records = training_records()
    train = folder / "train.json"
    train.write_text(json.dumps(records))
    qas = folder / "qas.csv"
    qas.write_text("".join(f"{r['question']}\t{r['answers']}\n" for r in records[:13]))
    return {"model": model, "ctx_dir": ctx_dir, "psgs": psgs, "embs": str(folder / "embs" / "psgs_*"), "train": str(train),
            "qas": str(qas), "records": records, "dir": folder}


def mining_config(data, out_file, **values):
    overrides = {
        "model_file": data["model"],
        "encoder.sequence_length": SEQUENCE_LENGTH,
        "input_file": data["train"],
        "ctx_datatsets": f"[{data['psgs']}]",
        "encoded_ctx_files": f"['{data['embs']}']",
        "out_file": str(out_file),
        "mine_rank_to": len(ALL_PASSAGES),
        "validation_workers": 1,
        "batch_size": 5,
    }
    overrides.update({key.replace("__", "."): value for key, value in values.items()})
    return compose_config([f"{key}={value}" for key, value in overrides.items()], "mine_hard_negatives")


@pytest.fixture(scope="module")
def ranking(data, tmp_path_factory):
    """The dense retriever's ranking of every passage for the 13 capital-style questions: (ids, has_answer)."""
    out_file = tmp_path_factory.mktemp("ranking") / "results.json"
    cfg = retriever_config(data["ctx_dir"], data["qas"], data["psgs"], data["embs"], str(out_file),
                           model_file=data["model"], n_docs=len(ALL_PASSAGES))
    run_dense_retriever(cfg)
    return [([ctx["id"] for ctx in record["ctxs"]], [ctx["has_answer"] for ctx in record["ctxs"]])
            for record in json.loads(out_file.read_text())]


def mine(data, out_file, **values):
    summary = mine_hard_negatives(mining_config(data, out_file, **values))
    return summary, json.loads(out_file.read_text())


def expected_negatives(ids, hits, positive_id, rank_from, rank_to, count):
    return [doc_id for rank, (doc_id, hit) in enumerate(zip(ids, hits), 1)
            if rank_from <= rank <= rank_to and not hit and doc_id != positive_id][:count]


@pytest.mark.parametrize("rank_from, rank_to, count", [(1, 24, 30), (3, 12, 4), (6, 6, 1)])
def test_mined_negatives_are_the_best_ranked_without_answer_or_positive(data, ranking, tmp_path, rank_from,
                                                                        rank_to, count):
    summary, mined = mine(data, tmp_path / "mined.json", mine_rank_from=rank_from, mine_rank_to=rank_to,
                          n_docs=24, num_hard_negatives=count, keep_existing_hard_negatives=False)
    for record, original, (ids, hits) in zip(mined[:12], data["records"][:12], ranking):
        positive_id = original["positive_ctxs"][0]["passage_id"]
        expected = expected_negatives(ids, hits, positive_id, rank_from, rank_to, count)
        negatives = record["hard_negative_ctxs"]
        if not expected:  # nothing to mine in the range: the file's own negative stays
            assert negatives == [BM25_NEGATIVE]
            continue
        assert [ctx["passage_id"] for ctx in negatives] == expected
        for ctx in negatives:
            assert not has_answer(original["answers"], ctx["text"])
            assert ctx["passage_id"] != positive_id and ctx["text"] != original["positive_ctxs"][0]["text"]
            assert (ctx["title"], ctx["text"]) == next((title, text) for pid, text, title in ALL_PASSAGES
                                                      if pid == ctx["passage_id"])
    assert summary.records == 15 and summary.passed_through == 1 and summary.without_answers == 1


def test_the_whole_collection_excludes_exactly_the_answers_and_the_positive(data, ranking, tmp_path):
    _, mined = mine(data, tmp_path / "mined.json", num_hard_negatives=100, keep_existing_hard_negatives=False)
    paris = {ctx["passage_id"] for ctx in mined[0]["hard_negative_ctxs"]}
    assert paris == {pid for pid, _, _ in ALL_PASSAGES} - {"1", "24"}  # its positive, and the other "paris" passage
    berlin = {ctx["passage_id"] for ctx in mined[1]["hard_negative_ctxs"]}
    assert berlin == {pid for pid, _, _ in ALL_PASSAGES} - {"2"}  # no passage holds its answer: the positive by id
    scores = [ctx["score"] for ctx in mined[0]["hard_negative_ctxs"]]
    assert scores == sorted(scores, reverse=True)


def test_keep_puts_the_mined_first_then_the_files_own(data, tmp_path):
    _, kept = mine(data, tmp_path / "kept.json", num_hard_negatives=2, keep_existing_hard_negatives=True)
    _, replaced = mine(data, tmp_path / "replaced.json", num_hard_negatives=2, keep_existing_hard_negatives=False)
    for with_own, without in zip(kept[:12], replaced[:12]):
        assert len(without["hard_negative_ctxs"]) == 2
        assert with_own["hard_negative_ctxs"] == without["hard_negative_ctxs"] + [BM25_NEGATIVE]


def test_questions_without_a_negative_keep_theirs_and_the_rest_is_unchanged(data, tmp_path, capsys):
    summary, mined = mine(data, tmp_path / "mined.json", keep_existing_hard_negatives=False)
    everywhere, no_answers, no_positive = mined[12:]
    assert everywhere == data["records"][12] and no_answers == data["records"][13]
    assert no_positive == data["records"][14]
    assert (summary.mined_questions, summary.no_negative_in_range, summary.without_answers,
            summary.passed_through) == (12, 1, 1, 1)
    assert summary.line(summary_options(data, tmp_path)) in capsys.readouterr().out
    for record, original in zip(mined[:12], data["records"][:12]):
        assert {**record, "hard_negative_ctxs": None} == {**original, "hard_negative_ctxs": None}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mined.json"], "written atomically, no temporary left"


def summary_options(data, tmp_path):
    from dpr.indexing.hard_negatives import MiningOptions

    return MiningOptions.from_config(mining_config(data, tmp_path / "mined.json", keep_existing_hard_negatives=False))


def test_output_trains(data, tmp_path):
    _, mined = mine(data, tmp_path / "mined.json", mine_rank_from=2, num_hard_negatives=3)
    samples = load_biencoder_samples([str(tmp_path / "mined.json")])
    assert len(samples) == 14  # the record without a positive is dropped, as for any DPR file
    assert [p.id for p in samples[0].hard_negative_passages] == \
        [ctx["passage_id"] for ctx in mined[0]["hard_negative_ctxs"]]
    model = tiny_bert_dir(tmp_path / "bert", dropout=0.1)
    cfg = compose_config(tiny_overrides(model, str(tmp_path / "mined.json"), str(tmp_path / "mined.json"),
                                        str(tmp_path / "out"), train__hard_negatives=2))
    _, run = run_trainer(cfg)
    assert [step.step for step in run.steps] == [1, 2, 3] and (tmp_path / "out" / "dpr_biencoder.0").is_file()


@pytest.mark.parametrize("values, option", [
    ({"mine_rank_from": 5, "mine_rank_to": 4}, "mine_rank_from=5"),
    ({"mine_rank_from": 0}, "mine_rank_from=0"),
    ({"mine_rank_to": 30, "n_docs": 20}, "n_docs=20"),
    ({"num_hard_negatives": 0}, "num_hard_negatives=0"),
    ({"retriever": "bm25"}, "retriever=dense"),
    ({"out_file": "mined.jsonl"}, "out_file=mined.jsonl"),
])
def test_options_that_cannot_work_are_named(data, tmp_path, values, option):
    with pytest.raises(MiningConfigError, match=option):
        values = dict(values)
        mine_hard_negatives(mining_config(data, values.pop("out_file", tmp_path / "mined.json"), **values))
    with pytest.raises(MiningConfigError, match="out_file must differ"):
        mine_hard_negatives(mining_config(data, data["train"]))


def test_ids_are_written_without_the_source_prefix():
    sources = [CtxSource("a.tsv", "wiki:"), CtxSource("b.tsv", "")]
    assert strip_source_prefix("wiki:17", sources) == "17" and strip_source_prefix("17", sources) == "17"


def test_script_reports_a_user_error_in_one_line(tmp_path):
    completed = subprocess.run([sys.executable, str(REPO_ROOT / "mine_hard_negatives.py"),
                                f"out_file={tmp_path / 'mined.json'}", f"hydra.run.dir={tmp_path}"],
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 1
    assert completed.stderr.strip().splitlines()[-1].startswith("error: input_file is required")


def test_shard_wise_search_mines_the_same(data, tmp_path):
    _, flat = mine(data, tmp_path / "flat.json", num_hard_negatives=5)
    _, sharded = mine(data, tmp_path / "sharded.json", num_hard_negatives=5, shard_search="true")
    assert sharded == flat


# ------------------------------------------------------------------------------------ positives, options, outputs
def candidate(rank, passage_id, text, has_answer=False):
    return Candidate(rank, passage_id, "title", text, 1.0 / rank, has_answer)


def bare_options(**values):
    fields = {"input_file": "in.json", "out_file": "out.json", "rank_from": 1, "rank_to": 100,
              "num_hard_negatives": 30, "keep_existing": False, "match": "string"}
    return MiningOptions(**{**fields, **values})


def test_a_positive_under_another_id_is_no_negative_whatever_its_spacing_case_or_unicode_form():
    """A collection can hold a positive twice (a dump re-split, a copy under another id): the copy differs at most
    in whitespace, case or Unicode normal form, and as a 'negative' it would teach the model to push the answer
    away."""
    positive = {"title": "Berlin", "text": "Berlin is the capital of Germany, on the Spree.", "passage_id": "2"}
    candidates = [
        candidate(1, "902", "Berlin  is the capital\nof Germany,\ton the Spree. "),
        candidate(2, "903", "BERLIN IS THE CAPITAL OF GERMANY, ON THE SPREE."),
        candidate(3, "904", "Caf\u00e9s line the Spree."),
        candidate(4, "905", "Munich is in Bavaria."),
    ]
    positives = [positive, {"title": "x", "text": "Cafe\u0301s  line the Spree.", "passage_id": "77"}]
    assert [c.passage_id for c in select_hard_negatives(candidates, positives, bare_options())] == ["905"]


def test_a_positive_id_written_with_its_source_prefix_is_matched():
    sources = [CtxSource("a.tsv", "wiki:")]
    positives = [{"title": "t", "text": "some text", "passage_id": "wiki:7"}]
    chosen = select_hard_negatives([candidate(1, "7", "other words"), candidate(2, "8", "more words")], positives,
                                   bare_options(), sources)
    assert [c.passage_id for c in chosen] == ["8"]


def bare_config(tmp_path, **values):
    """A mining configuration whose files exist but whose model does not: every check runs before any loading."""
    train = tmp_path / "train.json"
    if not train.exists():
        train.write_text(json.dumps(training_records()))
    overrides = {"model_file": tmp_path / "no_model.cp", "input_file": train, "ctx_datatsets": "[psgs.tsv]",
                 "encoded_ctx_files": "['embs_*']", "out_file": tmp_path / "mined.json"}
    overrides.update(values)
    return compose_config([f"{key}={value}" for key, value in overrides.items()], "mine_hard_negatives")


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if the training file is read or anything is retrieved."""
    forbid_calls(monkeypatch, "dpr.indexing.hard_negatives.read_records", "dpr.indexing.hard_negatives.retrieve",
                 "dpr.indexing.hard_negatives.RetrievalSettings.from_config")


@pytest.mark.parametrize("values, message", [
    ({"mine_rank_from": "abc"}, "^mine_rank_from='abc' must be a whole number"),
    ({"mine_rank_to": 2.5}, "^mine_rank_to=2.5 must be a whole number"),
    ({"mine_rank_to": "true"}, "^mine_rank_to=True must be a whole number"),
    ({"n_docs": "many"}, "^n_docs='many' must be a whole number"),
    ({"num_hard_negatives": -3}, "^num_hard_negatives=-3: mine at least 1"),
    ({"num_hard_negatives": "ten"}, "^num_hard_negatives='ten' must be a whole number"),
    ({"validation_workers": 0}, "^validation_workers=0 must be at least 1"),
    ({"keep_existing_hard_negatives": "maybe"}, "^keep_existing_hard_negatives='maybe' must be true or false"),
    ({"input_file": "missing.json"}, "^input_file=missing.json does not exist"),
    ({"input_file": "null"}, "^input_file is required"),
    ({"input_file": "/"}, "^input_file=/ is a folder: give the DPR"),
    ({"out_file": "/proc/nope/mined.json"}, "^out_file=/proc/nope/mined.json: its folder /proc/nope is not one"),
])
def test_a_mistaken_option_is_named_before_any_work(tmp_path, no_work, values, message):
    with pytest.raises(UserInputError, match=message):
        mine_hard_negatives(bare_config(tmp_path, **values))


@pytest.mark.parametrize("content, message", [
    ({"data": []}, "expected a JSON list"),
    ([], "holds no records"),
    ([{"question": "q?", "answers": "paris", "positive_ctxs": []}], "record 0: answers must be a list of strings"),
    ([{"question": "q?", "answers": ["paris"], "positive_ctxs": ["text"]}], "record 0: positive_ctxs must be a list "
                                                                           "of objects"),
    ([{"question": "q?", "answers": ["paris"], "positive_ctxs": [], "hard_negative_ctxs": {}}],
     "record 0: hard_negative_ctxs must be a list of objects"),
])
def test_a_training_file_that_is_not_one_is_named_before_retrieval(tmp_path, monkeypatch, content, message):
    """An answer given as a string once became its characters: 'a' was found in nearly every passage."""
    forbid_calls(monkeypatch, "dpr.indexing.hard_negatives.retrieve")
    (tmp_path / "bad.json").write_text(json.dumps(content))
    with pytest.raises(DataFileError, match=message):
        mine_hard_negatives(bare_config(tmp_path, input_file=tmp_path / "bad.json"))


def test_a_full_disk_names_the_mined_file_and_keeps_the_previous_one(data, tmp_path, monkeypatch):
    out_file = tmp_path / "mined.json"
    out_file.write_text("previous")
    (tmp_path / ".mined.json.k1ll3d00.tmp").write_text("a killed run's partial output")

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("dpr.indexing.hard_negatives.json.dump", full_disk)
    with pytest.raises(OutputWriteError, match=f"^could not write {out_file}: no space left on device"):
        mine_hard_negatives(mining_config(data, out_file))
    assert out_file.read_text() == "previous" and sorted(p.name for p in tmp_path.iterdir()) == ["mined.json"]


def test_kill_at_random_points_never_leaves_a_partial_output_and_a_rerun_mines_the_same(data, tmp_path):
    """`kill -9` of mine_hard_negatives.py at random moments: out_file is the previous complete file or the new
    complete one, never part of one; the rerun removes the killed runs' temporaries and writes what an
    uninterrupted run writes."""
    out_file = tmp_path / "mined.json"

    def command(out):
        return [sys.executable, str(REPO_ROOT / "mine_hard_negatives.py")] + [f"{key}={value}" for key, value in {
            "model_file": data["model"], "encoder.sequence_length": SEQUENCE_LENGTH, "input_file": data["train"],
            "ctx_datatsets": f"[{data['psgs']}]", "encoded_ctx_files": f"['{data['embs']}']", "out_file": out,
            "mine_rank_to": len(ALL_PASSAGES), "validation_workers": 1, "hydra.run.dir": tmp_path / "logs"}.items()]

    started = time.perf_counter()
    subprocess.run(command(tmp_path / "expected.json"), check=True, capture_output=True, timeout=300)
    duration = time.perf_counter() - started
    expected = json.loads((tmp_path / "expected.json").read_text())
    # the same mining to float noise: two processes (thread counts, kernels) differ in a score's last bits
    assert_same_but_float_noise(mine(data, tmp_path / "in_process.json")[1], expected)
    out_file.write_text("previous")
    rng = random.Random(21)
    for attempt in range(3):
        process = subprocess.Popen(command(out_file), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)
        time.sleep(rng.uniform(0.2, 1.0) * duration)
        os.killpg(process.pid, signal.SIGKILL)  # the script and any process it started
        process.wait()
        content = out_file.read_text()
        if content != "previous":
            assert_same_but_float_noise(json.loads(content), expected)
        (tmp_path / f".mined.json.k1ll{attempt}.tmp").write_text("partial")  # as a kill during the write leaves
    completed = subprocess.run(command(out_file), capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert_same_but_float_noise(json.loads(out_file.read_text()), expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["expected.json", "in_process.json", "logs", "mined.json"]


def test_outputs_of_two_processes_compare_to_float_noise_with_rankings_exact():
    mined = [{"question": "q", "hard_negative_ctxs": [{"passage_id": "3", "score": -8.359501838},
                                                      {"passage_id": "7", "score": -9.5}]}]
    noisy = json.loads(json.dumps(mined).replace("-8.359501838", "-8.359500885"))  # as seen on a fresh clone
    assert_same_but_float_noise(noisy, mined)
    reordered = json.loads(json.dumps(mined))
    reordered[0]["hard_negative_ctxs"].reverse()
    with pytest.raises(AssertionError):
        assert_same_but_float_noise(reordered, mined)
    with pytest.raises(AssertionError):
        assert_same_but_float_noise(json.loads(json.dumps(mined).replace("-9.5", "-9.4")), mined)


def test_a_kept_negative_that_is_a_mined_one_under_another_id_is_kept_once():
    mined = [candidate(1, "12", "Munich is in Bavaria.")]
    existing = [{"title": "m", "text": "munich is in  bavaria.", "passage_id": "bm25-9"},
                {"title": "h", "text": "Hamburg is a port.", "passage_id": "bm25-10"}]
    kept = hard_negative_ctxs(mined, existing, keep_existing=True)
    assert [ctx["passage_id"] for ctx in kept] == ["12", "bm25-10"]
