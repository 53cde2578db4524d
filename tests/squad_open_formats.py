"""BEIR, MS MARCO, pairs and tevatron copies of ../shared/data/squad_open, built by the tests: the corpus from
psgs.tsv, the queries (with ids and answers) from the biencoder JSONs, qrels = each question's gold passage."""
import csv
import json
from pathlib import Path

from tests.conftest import shared_data_dir

SQUAD_OPEN = shared_data_dir() / "squad_open"


def passage_rows() -> list:
    """psgs.tsv's data rows [id, text, title], as csv.reader gives them."""
    with open(SQUAD_OPEN / "psgs.tsv", encoding="utf-8", newline="") as source:
        return list(csv.reader(source, delimiter="\t"))[1:]


def questions(split: str, limit: int) -> list:
    """(id, question, answers, gold passage id, BM25 hard negatives as [id, text, title]) of the split's first
    `limit` questions."""
    records = json.loads((SQUAD_OPEN / f"biencoder-{split}.json").read_text(encoding="utf-8"))[:limit]
    return [(f"{split}-{i}", r["question"], r["answers"], r["positive_ctxs"][0]["passage_id"],
             [[c["passage_id"], c["text"], c["title"]] for c in r["hard_negative_ctxs"]])
            for i, r in enumerate(records)]


def write_beir(folder: Path, splits: dict) -> Path:
    """`splits`: split -> number of questions."""
    (folder / "qrels").mkdir(parents=True)
    with open(folder / "corpus.jsonl", "w", encoding="utf-8") as sink:
        for pid, text, title in passage_rows():
            sink.write(json.dumps({"_id": pid, "title": title, "text": text}) + "\n")
    with open(folder / "queries.jsonl", "w", encoding="utf-8") as sink:
        for split, limit in splits.items():
            for qid, question, answers, _, _ in questions(split, limit):
                sink.write(json.dumps({"_id": qid, "text": question, "metadata": {"answers": answers}}) + "\n")
    for split, limit in splits.items():
        lines = ["query-id\tcorpus-id\tscore"] + [f"{qid}\t{gold}\t1" for qid, _, _, gold, _ in questions(split, limit)]
        (folder / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def write_msmarco(folder: Path, splits: dict) -> Path:
    folder.mkdir(parents=True)
    with open(folder / "collection.tsv", "w", encoding="utf-8") as sink:
        sink.writelines(f"{pid}\t{text}\n" for pid, text, _ in passage_rows())
    for split, limit in splits.items():
        qs = questions(split, limit)
        (folder / f"queries.{split}.tsv").write_text("".join(f"{q[0]}\t{q[1]}\n" for q in qs), encoding="utf-8")
        (folder / f"qrels.{split}.tsv").write_text("".join(f"{q[0]}\t0\t{q[3]}\t1\n" for q in qs), encoding="utf-8")
    return folder


def gold_texts() -> dict:
    return {pid: text for pid, text, _ in passage_rows()}


def write_pairs(path: Path, split: str, limit: int) -> Path:
    texts = gold_texts()
    path.write_text("".join(f"{q}\t{texts[gold]}\n" for _, q, _, gold, _ in questions(split, limit)),
                    encoding="utf-8")
    return path


def write_tevatron(path: Path, split: str, limit: int) -> Path:
    rows = {pid: (text, title) for pid, text, title in passage_rows()}
    with open(path, "w", encoding="utf-8") as sink:
        for qid, question, answers, gold, negatives in questions(split, limit):
            sink.write(json.dumps({
                "query_id": qid, "query": question, "answers": answers,
                "positive_passages": [{"docid": gold, "title": rows[gold][1], "text": rows[gold][0]}],
                "negative_passages": [{"docid": pid, "title": title, "text": text} for pid, text, title in negatives],
            }) + "\n")
    return path
