"""convert_to_dpr.py: BEIR, MS MARCO, pairs and tevatron copies of squad_open convert back to its passages, exactly,
and to training data that trains; negatives are never a positive and follow the rank window and the score ratio;
bad inputs end in one line naming the file and line; the output folder appears whole or not at all."""
import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dpr.data.data_files import DataFileError
from dpr.data.passages import iter_passages
from dpr.foundation.errors import UserInputError
from dpr.indexing.bm25 import BM25Index, passage_text
from dpr.data.passages import passage_text_key
from dpr.interop.convert import ConvertOptions, convert
from dpr.interop.formats import SourceLayoutError, content_id
from dpr.interop.negatives import NegativeOptions
from tests.conftest import REPO_ROOT
from tests.retrieval_helpers import encode_directly, tiny_model, write_biencoder_checkpoint
from tests.squad_open_formats import (SQUAD_OPEN, passage_rows, questions, write_beir, write_msmarco, write_pairs,
                                      write_tevatron)
from tests.tiny_models import tiny_bert_dir
from tests.training_helpers import records_file

SPLITS = {"train": 48, "dev": 16}
NO_NEGATIVES = NegativeOptions("none", 30, 1, 100, None, "top", 0)


def options(fmt, source, out_dir, negatives=NO_NEGATIVES, **values) -> ConvertOptions:
    fields = dict(splits=None, biencoder_splits=("train", "dev"), split="train", skip_unknown_qrels=False,
                  model_file=None, dense_overrides=(), dataset_name=fmt)
    fields.update(values)
    return ConvertOptions(fmt, str(source), str(out_dir), negatives=negatives, **fields)


def bm25(count=3, from_rank=1, to_rank=100, ratio=None, sampling="top", seed=0) -> NegativeOptions:
    return NegativeOptions("bm25", count, from_rank, to_rank, ratio, sampling, seed)


def read_tsv(path: Path) -> list:
    with open(path, encoding="utf-8", newline="") as source:
        return list(csv.reader(source, delimiter="\t"))


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def beir_dir(tmp_path_factory):
    if not SQUAD_OPEN.is_dir():
        pytest.skip(f"shared data not found at {SQUAD_OPEN}")
    return write_beir(tmp_path_factory.mktemp("beir") / "squad_open_beir", SPLITS)


@pytest.fixture(scope="module")
def beir_converted(beir_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "dpr"
    reports = convert(options("beir", beir_dir, out))
    return out, reports


# ------------------------------------------------------------------------------------------------ round trips
def test_beir_copy_converts_back_to_squad_open_s_passages_queries_and_qrels(beir_converted):
    out, reports = beir_converted
    # the passages as DPR's reader reads them (csv rows, and the Passage objects embedding consumes) are the originals
    assert read_tsv(out / "psgs.tsv") == read_tsv(SQUAD_OPEN / "psgs.tsv")
    assert list(iter_passages(out / "psgs.tsv")) == list(iter_passages(SQUAD_OPEN / "psgs.tsv"))
    texts = {pid: (text, title) for pid, text, title in passage_rows()}
    for split, limit in SPLITS.items():
        expected = questions(split, limit)
        assert read_jsonl(out / f"{split}.queries.jsonl") == [
            {"id": qid, "question": question, "answers": answers} for qid, question, answers, _, _ in expected]
        assert (out / f"{split}.qrels.tsv").read_text().splitlines() == [f"{q[0]} 0 {q[3]} 1" for q in expected]
        records = json.loads((out / f"biencoder-{split}.json").read_text(encoding="utf-8"))
        assert len(records) == limit == reports[split].training_records
        for record, (_, question, answers, gold, _) in zip(records, expected):
            assert record["question"] == question and record["answers"] == answers
            [positive] = record["positive_ctxs"]
            assert (positive["passage_id"], positive["text"], positive["title"]) == (gold, *texts[gold])
            assert record["hard_negative_ctxs"] == [] and record["negative_ctxs"] == []
    manifest = json.loads((out / "conversion.json").read_text())
    assert sorted(manifest["files"]) == sorted(p.name for p in out.iterdir() if p.name != "conversion.json")
    assert manifest["passages"] == len(passage_rows())


def run_script(args, cwd, expect_ok=True):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if expect_ok:
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc


def tiny_bert_with_unique_vocab(folder: Path) -> str:
    """tests.tiny_models' BERT, its vocab.txt without the second "a" (a word and a character there) and without
    tokenizer.json, built from that vocab.txt: with it the tokenizer numbers the last token ("##9", in squad's
    "1169") past the embedding matrix."""
    model = tiny_bert_dir(folder, dropout=0.0)
    vocab = Path(model) / "vocab.txt"
    vocab.write_text("\n".join(dict.fromkeys(vocab.read_text().splitlines())) + "\n")
    (Path(model) / "tokenizer.json").unlink()
    return model


def test_converted_training_data_trains_with_train_dense_encoder(beir_dir, tmp_path):
    out = tmp_path / "dpr"
    convert(options("beir", beir_dir, out, bm25(count=2)))
    model = tiny_bert_with_unique_vocab(tmp_path / "bert")
    run_script([str(REPO_ROOT / "train_dense_encoder.py"), f"train_datasets=[{out / 'biencoder-train.json'}]",
                f"dev_datasets=[{out / 'biencoder-dev.json'}]", f"output_dir={tmp_path / 'run'}",
                f"encoder.pretrained_model_cfg={model}", "encoder.sequence_length=32", "train.batch_size=16",
                "train.dev_batch_size=16", "train.hard_negatives=1", "train.num_train_epochs=1",
                "train.log_batch_step=1"], tmp_path)
    steps = records_file(tmp_path / "run", "step")
    assert [s["step"] for s in steps] == [1, 2, 3] and all(np.isfinite(s["loss"]) for s in steps)
    assert (tmp_path / "run" / "dpr_biencoder.0").is_file()


def test_msmarco_copy_gives_the_same_ids_texts_and_qrels(beir_converted, tmp_path):
    beir_out, _ = beir_converted
    source = write_msmarco(tmp_path / "msmarco", SPLITS)
    out = tmp_path / "dpr"
    convert(options("msmarco", source, out))
    # MS MARCO's collection has no titles: ids and texts are the originals', titles empty
    expected_rows = [[pid, text, ""] for pid, text, _ in passage_rows()]
    assert read_tsv(out / "psgs.tsv") == [["id", "text", "title"]] + expected_rows
    for split in SPLITS:
        assert (out / f"{split}.qrels.tsv").read_bytes() == (beir_out / f"{split}.qrels.tsv").read_bytes()
        queries = read_jsonl(out / f"{split}.queries.jsonl")
        assert [(q["id"], q["question"], q["answers"]) for q in queries] == [
            (q["id"], q["question"], []) for q in read_jsonl(beir_out / f"{split}.queries.jsonl")]
        positives = [r["positive_ctxs"][0]["passage_id"]
                     for r in json.loads((out / f"biencoder-{split}.json").read_text())]
        assert positives == [q[3] for q in questions(split, SPLITS[split])]


def test_pairs_get_content_ids_that_are_stable_and_dedupe_repeated_texts(tmp_path):
    if not SQUAD_OPEN.is_dir():
        pytest.skip("shared data absent")
    pairs = write_pairs(tmp_path / "pairs.tsv", "train", 60)
    expected = questions("train", 60)
    texts = {pid: text for pid, text, _ in passage_rows()}
    convert(options("pairs", pairs, tmp_path / "a"))
    rows = read_tsv(tmp_path / "a" / "psgs.tsv")[1:]
    gold_texts = list(dict.fromkeys(texts[q[3]] for q in expected))  # first-seen order, each text once
    assert len(gold_texts) < len(expected)  # squad questions share paragraphs: the test covers dedup
    assert rows == [[content_id(text), text, ""] for text in gold_texts]
    records = json.loads((tmp_path / "a" / "biencoder-train.json").read_text())
    assert [(r["question"], r["positive_ctxs"][0]["text"]) for r in records] == [(q[1], texts[q[3]]) for q in expected]
    queries = read_jsonl(tmp_path / "a" / "train.queries.jsonl")
    assert [q["id"] for q in queries] == [content_id(q[1]) for q in expected]
    # the same rows in another order, as JSON lines: the same ids
    shuffled = [{"query": q[1], "positive": texts[q[3]]} for q in expected]
    random.Random(3).shuffle(shuffled)
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in shuffled))
    convert(options("pairs", jsonl, tmp_path / "b"))
    assert sorted(read_tsv(tmp_path / "b" / "psgs.tsv")[1:]) == sorted(rows)
    assert sorted((tmp_path / "b" / "train.qrels.tsv").read_text().splitlines()) == sorted(
        (tmp_path / "a" / "train.qrels.tsv").read_text().splitlines())


def test_rows_of_one_query_make_one_query_with_every_positive_and_no_positive_as_negative(tmp_path):
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("who wrote hamlet?\tshakespeare wrote hamlet\tmarlowe wrote faust\n"
                     "who wrote hamlet?\thamlet is a play by shakespeare\tshakespeare wrote hamlet\n"
                     "what is rome?\trome is a city\n")
    reports = convert(options("pairs", pairs, tmp_path / "out"))
    records = json.loads((tmp_path / "out" / "biencoder-train.json").read_text())
    assert [r["question"] for r in records] == ["who wrote hamlet?", "what is rome?"]
    assert [c["text"] for c in records[0]["positive_ctxs"]] == ["shakespeare wrote hamlet",
                                                                "hamlet is a play by shakespeare"]
    assert [c["text"] for c in records[0]["hard_negative_ctxs"]] == ["marlowe wrote faust"]
    stats = reports["train"].stats
    assert stats.given == 1 and stats.dropped_given_positive == 1 and stats.positives == [2, 1]
    assert len(read_tsv(tmp_path / "out" / "psgs.tsv")) == 1 + 4


def test_tevatron_file_keeps_docids_and_its_negatives(tmp_path):
    if not SQUAD_OPEN.is_dir():
        pytest.skip("shared data absent")
    source = write_tevatron(tmp_path / "train.jsonl", "train", 30)
    convert(options("tevatron", source, tmp_path / "out"))
    originals = {pid: [pid, text, title] for pid, text, title in passage_rows()}
    rows = read_tsv(tmp_path / "out" / "psgs.tsv")[1:]
    assert all(row == originals[row[0]] for row in rows) and len({r[0] for r in rows}) == len(rows)
    records = json.loads((tmp_path / "out" / "biencoder-train.json").read_text())
    for record, (_, question, answers, gold, negatives) in zip(records, questions("train", 30)):
        assert record["answers"] == answers and record["positive_ctxs"][0]["passage_id"] == gold
        assert [c["passage_id"] for c in record["hard_negative_ctxs"]] == [n[0] for n in negatives if n[0] != gold]


def test_flag_embedding_lines_get_content_ids_and_keep_their_negatives(tmp_path):
    source = tmp_path / "flag.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in [
        {"query": "who wrote hamlet", "pos": ["shakespeare wrote hamlet"],
         "neg": ["rome is a city", "shakespeare wrote hamlet"]},
        {"query": "what is rome", "pos": ["rome is a city"], "neg": ["paris is a city"]},
    ]))
    reports = convert(options("tevatron", source, tmp_path / "out"))
    records = json.loads((tmp_path / "out" / "biencoder-train.json").read_text())
    assert [[c["passage_id"] for c in r["hard_negative_ctxs"]] for r in records] == [
        [content_id("rome is a city")], [content_id("paris is a city")]]
    assert [r["positive_ctxs"][0]["passage_id"] for r in records] == [content_id("shakespeare wrote hamlet"),
                                                                        content_id("rome is a city")]
    assert reports["train"].stats.dropped_given_positive == 1
    assert [row[0] for row in read_tsv(tmp_path / "out" / "psgs.tsv")[1:]] == [
        content_id(t) for t in ("shakespeare wrote hamlet", "rome is a city", "paris is a city")]


# ------------------------------------------------------------------------------------------------ negatives
def bm25_ranking(index: BM25Index, question: str, rows: list) -> tuple[list, np.ndarray]:
    scores = index.scores(question)
    order = np.lexsort((np.arange(len(scores)), -scores))
    return [rows[i][0] for i in order], scores


@pytest.mark.parametrize("from_rank,ratio", [(1, 0.5), (3, None)])
def test_bm25_negatives_follow_the_window_the_ratio_and_never_name_a_positive(beir_dir, tmp_path, from_rank, ratio):
    negatives = bm25(count=4, from_rank=from_rank, to_rank=40, ratio=ratio)
    reports = convert(options("beir", beir_dir, tmp_path / "out", negatives, splits=("dev",)))
    rows = read_tsv(tmp_path / "out" / "psgs.tsv")[1:]
    records = json.loads((tmp_path / "out" / "biencoder-dev.json").read_text())
    dropped = {"rank": 0, "positive": 0, "ratio": 0}
    index = BM25Index.build([r[0] for r in rows], [passage_text(r[2], r[1]) for r in rows])
    for record, (_, question, _, gold, _) in zip(records, questions("dev", SPLITS["dev"])):
        ranking, scores = bm25_ranking(index, question, rows)
        score = dict(zip([r[0] for r in rows], scores))
        positive = record["positive_ctxs"][0]
        assert positive["passage_id"] == gold and positive["score"] == pytest.approx(score[gold], abs=1e-4)
        expected = []
        for rank, pid in enumerate(ranking[:40], start=1):  # the rule, walked rank by rank
            if len(expected) == 4 or score[pid] <= 0:
                break
            if rank < from_rank:
                dropped["rank"] += 1
            elif pid == gold:
                dropped["positive"] += 1
            elif ratio is not None and score[pid] > ratio * score[gold]:
                dropped["ratio"] += 1
            else:
                expected.append(pid)
        assert [c["passage_id"] for c in record["hard_negative_ctxs"]] == expected
        for ctx in record["hard_negative_ctxs"]:
            assert passage_text_key(ctx["text"]) != passage_text_key(positive["text"])
            assert ctx["score"] == pytest.approx(score[ctx["passage_id"]], abs=1e-4)
    stats = reports["dev"].stats
    assert (stats.dropped_rank, stats.dropped_positive, stats.dropped_ratio) == (
        dropped["rank"], dropped["positive"], dropped["ratio"])
    # each filter was exercised: the positive and the ratio from rank 1, the window from rank 3
    assert (dropped["positive"] > 0 and dropped["ratio"] > 0) if from_rank == 1 else dropped["rank"] > 0
    assert sum(stats.found) == sum(len(r["hard_negative_ctxs"]) for r in records)


def test_random_sampling_is_seeded(beir_dir, tmp_path):
    def hard_ids(seed, name):
        convert(options("beir", beir_dir, tmp_path / name, bm25(count=3, sampling="random", seed=seed),
                        splits=("dev",)))
        return [[c["passage_id"] for c in r["hard_negative_ctxs"]]
                for r in json.loads((tmp_path / name / "biencoder-dev.json").read_text())]

    assert hard_ids(1, "a") == hard_ids(1, "b") != hard_ids(2, "c")


def test_a_second_positive_is_never_a_negative_though_bm25_ranks_it_high(tmp_path):
    source = tiny_beir(tmp_path / "beir", qrels={"train": "q1\tp1\t1\nq1\tp2\t2\nq2\tp3\t1\n"})
    convert(options("beir", source, tmp_path / "out", bm25(count=5)))
    [q1, _] = json.loads((tmp_path / "out" / "biencoder-train.json").read_text())
    assert [c["passage_id"] for c in q1["positive_ctxs"]] == ["p2", "p1"]  # highest grade first
    assert {c["passage_id"] for c in q1["hard_negative_ctxs"]}.isdisjoint({"p1", "p2", "p1copy"})


def test_dense_negatives_rank_by_the_bi_encoder_and_exclude_positives(tmp_path):
    # two splits: the second reuses the passages' embedding and encodes its own questions
    source = tiny_beir(tmp_path / "beir", qrels={"train": "q1\tp1\t1\nq2\tp3\t1\n", "dev": "q2\tp3\t1\n"})
    model = tiny_model(tmp_path / "bert")
    checkpoint = write_biencoder_checkpoint(tmp_path / "cp", model, model)
    negatives = NegativeOptions("dense", 3, 1, 10, None, "top", 0)
    reports = convert(options("beir", source, tmp_path / "out", negatives, model_file=checkpoint,
                              dense_overrides=("batch_size=4",)))
    records = [record for split in ("train", "dev")
               for record in json.loads((tmp_path / "out" / f"biencoder-{split}.json").read_text())]
    assert len(records) == 3
    rows = read_tsv(tmp_path / "out" / "psgs.tsv")[1:]
    passages = encode_directly(model, [r[1] for r in rows], [r[2] for r in rows]).numpy()
    for record in records:
        query = encode_directly(model, [record["question"]]).numpy()[0]
        scores = dict(zip([r[0] for r in rows], passages @ query))
        positive = record["positive_ctxs"][0]
        assert positive["score"] == pytest.approx(float(scores[positive["passage_id"]]), abs=1e-3)
        hard = [c["passage_id"] for c in record["hard_negative_ctxs"]]
        ranked = sorted(scores, key=lambda p: -scores[p])[:10]
        expected = [p for p in ranked if p != positive["passage_id"]
                    and passage_text_key(dict((r[0], r[1]) for r in rows)[p]) != passage_text_key(positive["text"])]
        assert hard == expected[:3]
    assert reports["train"].stats.dropped_positive + reports["train"].stats.dropped_positive_text >= 1
    assert not any(p.name.startswith(".") for p in (tmp_path / "out").iterdir())  # no embeddings left behind


# ------------------------------------------------------------------------------------------------ bad inputs
CORPUS = [("p1", "shakespeare wrote hamlet in london", "Hamlet"),
          ("p2", "hamlet is a tragedy written by shakespeare", "Hamlet play"),
          ("p1copy", "shakespeare wrote hamlet in london", "Hamlet"),
          ("p3", "rome is the capital of italy", "Rome"),
          ("p4", "paris is the capital of france", "Paris"),
          ("p5", "london is on the thames", "London")]


def tiny_beir(folder: Path, qrels: dict, corpus=CORPUS, queries=None) -> Path:
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "text": t, "title": ti}) + "\n"
                                                 for i, t, ti in corpus))
    queries = queries or [("q1", "who wrote hamlet"), ("q2", "what is the capital of italy")]
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": i, "text": t}) + "\n" for i, t in queries))
    for split, lines in qrels.items():
        (folder / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + lines)
    return folder


def test_a_qrels_line_naming_an_unknown_query_is_refused_or_skipped_and_counted(tmp_path):
    source = tiny_beir(tmp_path / "beir", qrels={"train": "q1\tp1\t1\nq9\tp3\t1\nq2\tp3\t1\n"})
    with pytest.raises(DataFileError, match=r"qrels/train.tsv, line 3: query 'q9' is not in .*queries.jsonl.*"
                                            r"--skip_unknown_qrels"):
        convert(options("beir", source, tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    reports = convert(options("beir", source, tmp_path / "out", skip_unknown_qrels=True))
    assert reports["train"].unknown_qrels_skipped == 1
    assert (tmp_path / "out" / "train.qrels.tsv").read_text() == "q1 0 p1 1\nq2 0 p3 1\n"


def test_a_qrels_line_naming_an_unknown_passage_is_refused_or_skipped_and_counted(tmp_path):
    source = tiny_beir(tmp_path / "beir", qrels={"train": "q1\tp1\t1\nq2\tp3\t1\nq2\tp404\t1\n"})
    with pytest.raises(DataFileError, match=r"qrels/train.tsv, line 4: passage 'p404' is not in the collection"):
        convert(options("beir", source, tmp_path / "out"))
    reports = convert(options("beir", source, tmp_path / "out", skip_unknown_qrels=True))
    assert reports["train"].unknown_qrels_skipped == 1 and reports["train"].judgements == 2


def test_a_training_query_without_a_positive_is_counted_and_skipped(tmp_path):
    source = tiny_beir(tmp_path / "beir", qrels={"train": "q1\tp1\t0\nq2\tp3\t1\n"})
    reports = convert(options("beir", source, tmp_path / "out"))
    assert reports["train"].without_positive_skipped == 1 and reports["train"].training_records == 1
    assert [r["question"] for r in json.loads((tmp_path / "out" / "biencoder-train.json").read_text())] == [
        "what is the capital of italy"]
    assert (tmp_path / "out" / "train.qrels.tsv").read_text() == "q1 0 p1 0\nq2 0 p3 1\n"  # judged, kept


def test_duplicate_ids_are_refused_naming_both_lines(tmp_path):
    corpus = CORPUS + [("p4", "another text", "")]
    source = tiny_beir(tmp_path / "beir", qrels={"train": "q1\tp1\t1\n"}, corpus=corpus)
    with pytest.raises(DataFileError, match=r"corpus.jsonl, line 7: passage id 'p4' is already used at "
                                            r".*corpus.jsonl, line 5"):
        convert(options("beir", source, tmp_path / "out"))
    source = tiny_beir(tmp_path / "beir2", qrels={"train": "q1\tp1\t1\n"}, queries=[("q1", "a"), ("q1", "b")])
    with pytest.raises(DataFileError, match=r"queries.jsonl, line 2: query id 'q1' is used a second time"):
        convert(options("beir", source, tmp_path / "out"))
    source = tiny_beir(tmp_path / "beir3", qrels={"train": "q1\tp1\t1\nq1\tp1\t2\n"})
    with pytest.raises(DataFileError, match=r"train.tsv, line 3: query 'q1' and passage 'p1' are judged a second"):
        convert(options("beir", source, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_missing_splits_files_and_the_wrong_format_are_named(tmp_path):
    source = tiny_beir(tmp_path / "beir", qrels={"train": "q1\tp1\t1\n"})
    with pytest.raises(SourceLayoutError, match=r"split 'test' is not in --input .*beir: it has train"):
        convert(options("beir", source, tmp_path / "out", splits=("test",)))
    with pytest.raises(SourceLayoutError, match=r"has no collection.tsv .*corpus.jsonl, which is BEIR's: use "
                                                r"--format beir"):
        convert(options("msmarco", source, tmp_path / "out"))
    marco = write_small_msmarco(tmp_path / "marco")
    with pytest.raises(SourceLayoutError, match=r"collection.tsv, which is MS MARCO's: use --format msmarco"):
        convert(options("beir", marco, tmp_path / "out"))
    (marco / "queries.train.tsv").unlink()
    with pytest.raises(SourceLayoutError, match=r"queries.train.tsv does not exist"):
        convert(options("msmarco", marco, tmp_path / "out"))
    with pytest.raises(SourceLayoutError, match=r"is a file, but --format beir reads a folder"):
        convert(options("beir", source / "corpus.jsonl", tmp_path / "out"))
    with pytest.raises(SourceLayoutError, match=r"--input .*nothing does not exist"):
        convert(options("tevatron", tmp_path / "nothing", tmp_path / "out"))
    tevatron = tmp_path / "t.jsonl"
    tevatron.write_text(json.dumps({"query": "q", "positive_passages": [{"docid": "1", "text": "t"}]}) + "\n")
    with pytest.raises(DataFileError, match=r"t.jsonl, line 1: 'positive_passages' is tevatron's field: use "
                                            r"--format tevatron"):
        convert(options("pairs", tevatron, tmp_path / "out"))
    (source / "qrels" / "train.tsv").write_text("q1 0 p1 1\n")
    with pytest.raises(DataFileError, match=r"train.tsv, line 1: expected 3 tab-separated columns .* TREC's four "
                                            r"columns"):
        convert(options("beir", source, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def write_small_msmarco(folder: Path) -> Path:
    folder.mkdir()
    (folder / "collection.tsv").write_text("".join(f"{i}\t{t}\n" for i, t, _ in CORPUS))
    (folder / "queries.train.tsv").write_text("q1\twho wrote hamlet\n")
    (folder / "qrels.train.tsv").write_text("q1\t0\tp1\t1\n")
    return folder


def test_a_carriage_return_inside_a_text_does_not_cut_its_row(tmp_path):
    marco = write_small_msmarco(tmp_path / "marco")
    with open(marco / "collection.tsv", "a", newline="") as sink:
        sink.write("p6\tbefore\rafter\r\np7\tlast\n")
    convert(options("msmarco", marco, tmp_path / "out"))
    assert read_tsv(tmp_path / "out" / "psgs.tsv")[-2:] == [["p6", "before after", ""], ["p7", "last", ""]]


def test_the_script_ends_a_bad_input_in_one_line(tmp_path):
    source = tiny_beir(tmp_path / "beir", qrels={"train": "q1\tp404\t1\n"})
    proc = run_script([str(REPO_ROOT / "convert_to_dpr.py"), "--format", "beir", "--input", str(source),
                       "--out_dir", str(tmp_path / "out")], tmp_path, expect_ok=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in proc.stderr
    assert "train.tsv, line 2: passage 'p404'" in proc.stderr


# ------------------------------------------------------------------------------------------------ the out_dir
def test_the_output_set_appears_whole_or_the_previous_one_stays(tmp_path):
    source = tiny_beir(tmp_path / "beir", qrels={"train": "q1\tp1\t1\n"})
    out = tmp_path / "out"
    convert(options("beir", source, out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (source / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\tp404\t1\n")
    with pytest.raises(DataFileError):  # fails after psgs.tsv was written (unknown passages are known then)
        convert(options("beir", source, out))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    (source / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq2\tp3\t1\n")
    convert(options("beir", source, out))  # a previous conversion is replaced
    assert (out / "train.qrels.tsv").read_text() == "q2 0 p3 1\n"


def test_an_out_dir_holding_other_files_is_refused_before_any_work(tmp_path):
    source = tiny_beir(tmp_path / "beir", qrels={"train": "q1\tp1\t1\n"})
    out = tmp_path / "runs"
    out.mkdir()
    (out / "dpr_biencoder.0").write_text("a checkpoint")
    with pytest.raises(UserInputError, match=r"--out_dir .*runs holds files a conversion did not write \(e.g. "
                                             r"dpr_biencoder.0\)"):
        convert(options("beir", source, out))
    assert [p.name for p in out.iterdir()] == ["dpr_biencoder.0"]
