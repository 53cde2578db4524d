#!/usr/bin/env python3
"""Build the quickstart sample's retriever JSON and QA CSV files from its two hand-written sources.

Sources (both written for this repository):
  psgs.tsv       DPR passage format: header ``id<TAB>text<TAB>title``, CSV-quoted text.
  questions.tsv  header ``passage_id<TAB>question<TAB>answers``; answers are separated by `` | `` and every
                 one of them must occur (case-insensitively) in the text of passage ``passage_id``.

Outputs (next to this script unless --out_dir is given):
  biencoder-{train,dev}.json   DPR retriever training format (positive, 3 random negatives, up to 3 hard negatives)
  {train,dev}.qa.csv           DPR QA format: ``question<TAB>['answer', ...]``

Questions are split by topic (passage title): the titles in --dev_titles go to dev, so dev passages come from
topics never seen in training. Random and hard negatives never contain any of the question's answers.
Hard negatives are the passages with the highest score = (number of shared non-stopword words with the question)
+ 2 if the passage has the same title as the positive; ties are broken by a seeded shuffle.

Usage: python data/sample/make_sample.py [--seed 12345] [--out_dir DIR]
"""

import argparse
import ast
import csv
import json
import os
import random
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

DEV_TITLES = [
    "Sorrel Valley weaving",
    "Venholt astronomical clock",
    "Lake Imbry",
    "Orin Daley",
    "Gannet Head Lighthouse",
]

STOPWORDS = set(
    """a an the of in on at to for from by with and or but is are was were be been being has have had do does did
    what which who whom whose when where why how many much long far often since year years into its it their his her
    this that these those as than then there also not no after before over under about other called name named""".split()
)


def words(text):
    return {w for w in re.findall(r"\w+", text.lower()) if w not in STOPWORDS}


def has_answer(text, answers):
    low = text.lower()
    return any(a.lower() in low for a in answers)


def read_passages(path):
    passages = {}
    with open(path, encoding="utf-8", newline="") as f:
        rows = csv.reader(f, delimiter="\t")
        header = next(rows)
        if header != ["id", "text", "title"]:
            sys.exit(f"{path}: header must be id, text, title; got {header}")
        for n, row in enumerate(rows, 2):
            if len(row) != 3:
                sys.exit(f"{path}:{n}: expected 3 columns, got {len(row)}")
            pid, text, title = row
            if pid in passages:
                sys.exit(f"{path}:{n}: duplicate id {pid}")
            passages[pid] = {"id": pid, "text": text, "title": title}
    return passages


def read_questions(path, passages):
    questions = []
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        if header != ["passage_id", "question", "answers"]:
            sys.exit(f"{path}: header must be passage_id, question, answers; got {header}")
        for n, line in enumerate(f, 2):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            cols = line.split("\t")
            if len(cols) != 3:
                sys.exit(f"{path}:{n}: expected 3 tab-separated columns, got {len(cols)}")
            pid, question, answers = cols[0].strip(), cols[1].strip(), [a.strip() for a in cols[2].split("|")]
            answers = [a for a in answers if a]
            if pid not in passages:
                sys.exit(f"{path}:{n}: unknown passage id {pid}")
            if not question or not answers:
                sys.exit(f"{path}:{n}: empty question or answers")
            for a in answers:
                if a.lower() not in passages[pid]["text"].lower():
                    sys.exit(f"{path}:{n}: answer {a!r} does not occur in passage {pid}")
            questions.append({"passage_id": pid, "question": question, "answers": answers})
    return questions


def ctx(p):
    return {"title": p["title"], "text": p["text"], "score": 0, "title_score": 0, "passage_id": p["id"]}


def build(questions, passages, rng, n_neg=3, n_hard=3):
    all_ids = list(passages)
    samples = []
    for q in questions:
        pos = passages[q["passage_id"]]
        cands = [pid for pid in all_ids if pid != pos["id"] and not has_answer(passages[pid]["text"], q["answers"])]
        qw = words(q["question"])
        order = cands[:]
        rng.shuffle(order)  # seeded tie-break
        order.sort(
            key=lambda pid: len(qw & words(passages[pid]["text"])) + (2 if passages[pid]["title"] == pos["title"] else 0),
            reverse=True,
        )
        hard = order[:n_hard]
        rest = [pid for pid in cands if pid not in hard]
        neg = rng.sample(rest, min(n_neg, len(rest)))
        samples.append(
            {
                "dataset": "sample",
                "question": q["question"],
                "answers": q["answers"],
                "positive_ctxs": [ctx(pos)],
                "negative_ctxs": [ctx(passages[pid]) for pid in neg],
                "hard_negative_ctxs": [ctx(passages[pid]) for pid in hard],
            }
        )
    return samples


def write_qas(path, samples):
    with open(path, "w", encoding="utf-8") as f:
        for s in samples:
            if "\t" in s["question"] or "\n" in s["question"]:
                sys.exit(f"question contains a tab or newline: {s['question']!r}")
            f.write(f"{s['question']}\t{s['answers']!r}\n")


def validate(out_dir, psgs_path, counts):
    with open(psgs_path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert rows[0] == ["id", "text", "title"] and all(len(r) == 3 for r in rows), "psgs.tsv must have 3 columns per row"
    for split, n in counts.items():
        with open(os.path.join(out_dir, f"biencoder-{split}.json"), encoding="utf-8") as f:
            data = json.load(f)
        assert len(data) == n
        for s in data:
            assert len(s["positive_ctxs"]) == 1 and has_answer(s["positive_ctxs"][0]["text"], s["answers"])
            for c in s["negative_ctxs"] + s["hard_negative_ctxs"]:
                assert not has_answer(c["text"], s["answers"]), (s["question"], c["passage_id"])
        with open(os.path.join(out_dir, f"{split}.qa.csv"), encoding="utf-8", newline="") as f:
            qas = list(csv.reader(f, delimiter="\t"))
        assert len(qas) == n
        for (question, answers), s in zip(qas, data):
            parsed = ast.literal_eval(answers)
            assert question == s["question"] and parsed == s["answers"], (question, answers)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--psgs", default=os.path.join(HERE, "psgs.tsv"))
    ap.add_argument("--questions", default=os.path.join(HERE, "questions.tsv"))
    ap.add_argument("--out_dir", default=HERE)
    ap.add_argument("--dev_titles", nargs="*", default=DEV_TITLES)
    ap.add_argument("--seed", type=int, default=12345)
    args = ap.parse_args()

    passages = read_passages(args.psgs)
    questions = read_questions(args.questions, passages)
    titles = {p["title"] for p in passages.values()}
    unknown = set(args.dev_titles) - titles
    if unknown:
        sys.exit(f"unknown dev titles: {sorted(unknown)}")

    elsewhere = 0
    for q in questions:
        others = [pid for pid, p in passages.items() if pid != q["passage_id"] and has_answer(p["text"], q["answers"])]
        if others:
            elsewhere += 1
            print(f"note: answer of {q['question']!r} also occurs in passages {others}")

    rng = random.Random(args.seed)
    splits = {
        "train": [q for q in questions if passages[q["passage_id"]]["title"] not in args.dev_titles],
        "dev": [q for q in questions if passages[q["passage_id"]]["title"] in args.dev_titles],
    }
    os.makedirs(args.out_dir, exist_ok=True)
    for split, qs in splits.items():
        samples = build(qs, passages, rng)
        with open(os.path.join(args.out_dir, f"biencoder-{split}.json"), "w", encoding="utf-8") as f:
            json.dump(samples, f, indent=1, ensure_ascii=False)
            f.write("\n")
        write_qas(os.path.join(args.out_dir, f"{split}.qa.csv"), samples)
    validate(args.out_dir, args.psgs, {k: len(v) for k, v in splits.items()})

    n_topics = {k: len({passages[q["passage_id"]]["title"] for q in v}) for k, v in splits.items()}
    print(
        f"{len(passages)} passages, {len(titles)} topics; "
        f"train {len(splits['train'])} questions ({n_topics['train']} topics), "
        f"dev {len(splits['dev'])} questions ({n_topics['dev']} topics); "
        f"{elsewhere} questions have an answer that also occurs in another passage"
    )


if __name__ == "__main__":
    main()
