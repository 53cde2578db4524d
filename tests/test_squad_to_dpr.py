"""SQuAD-to-DPR conversion: §1.6 schema, answer-free negatives, TSV/CSV round trips, the article split."""
import ast
import csv
import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dpr.data.data_files import DataFileError
from dpr.interop.squad_to_dpr import convert_squad, read_squad, split_articles
from dpr.evaluation.qa_validation import has_answer

REPO_ROOT = Path(__file__).resolve().parents[1]
CTX_FIELDS = {"title": str, "text": str, "score": float, "title_score": int, "passage_id": str}

ARTICLES = {
    "Super_Bowl_50": [
        ("Super Bowl 50 was played at Levi's Stadium in Santa Clara. The Denver Broncos beat the Carolina Panthers.",
         [("Where was Super Bowl 50 played?", ["Levi's Stadium", "Levi's Stadium"]),
          ("Who won Super Bowl 50?", ["Denver Broncos", "the Denver Broncos"])]),
        ("The halftime show was headlined by Coldplay,\twith Beyoncé and Bruno Mars as guests.\n"
         "It was watched widely.",
         [("Who headlined the Super Bowl 50 halftime show?", ["Coldplay"])]),
    ],
    "Warsaw": [
        ("Warsaw is the capital of Poland. The Vistula river flows through Warsaw.",
         [("What river flows through Warsaw?", ["Vistula"])]),
        ("The \"Mermaid of Warsaw\" statue is the symbol of the city of Warsaw.",
         [("What statue is the symbol of Warsaw?", ["\"Mermaid of Warsaw\"", "Mermaid of Warsaw"])]),
    ],
    "Oxygen": [
        ("Oxygen is a chemical element with atomic number 8. Oxygen was discovered by Carl Wilhelm Scheele.",
         [("Who discovered oxygen?", ["Carl Wilhelm Scheele"])]),
        ("Liquid oxygen is pale blue. Oxygen makes up almost half of the Earth's crust by mass.",
         [("What colour is liquid oxygen?", ["pale blue"])]),
    ],
    "Normans": [
        ("The Normans gave their name to Normandy, a region of France. Rollo was their first ruler.",
         [("Who was the first Norman ruler?", ["Rollo"])]),
        ("The Norman conquest of England began in 1066 under William the Conqueror.",
         [("When did the Norman conquest of England begin?", ["1066"])]),
    ],
}


def write_squad(path: Path) -> Path:
    data = [{"title": title,
             "paragraphs": [{"context": context,
                             "qas": [{"id": f"{title}-{p}-{q}", "question": question,
                                      "answers": [{"text": answer, "answer_start": context.find(answer)}
                                                  for answer in answers]}
                                     for q, (question, answers) in enumerate(qas)]}
                            for p, (context, qas) in enumerate(paragraphs)]}
            for title, paragraphs in ARTICLES.items()]
    path.write_text(json.dumps({"version": "1.1", "data": data}), encoding="utf-8")
    return path


def read_passages(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8", newline="") as source:
        return list(csv.reader(source, delimiter="\t"))


def read_qas(path: Path) -> list[tuple[str, list[str]]]:
    with open(path, encoding="utf-8", newline="") as source:
        return [(question, ast.literal_eval(answers)) for question, answers in csv.reader(source, delimiter="\t")]


def check_sample_schema(sample: dict) -> None:
    assert isinstance(sample["dataset"], str) and isinstance(sample["question"], str)
    assert sample["answers"] and all(isinstance(answer, str) for answer in sample["answers"])
    assert len(sample["positive_ctxs"]) == 1
    for field in ("positive_ctxs", "negative_ctxs", "hard_negative_ctxs"):
        for ctx in sample[field]:
            assert {key: type(value) for key, value in ctx.items()} == CTX_FIELDS


def check_answers_and_negatives(sample: dict, max_hard: int) -> None:
    [positive] = sample["positive_ctxs"]
    assert has_answer(sample["answers"], positive["text"])
    assert len(sample["hard_negative_ctxs"]) <= max_hard
    for ctx in sample["hard_negative_ctxs"] + sample["negative_ctxs"]:
        assert not has_answer(sample["answers"], ctx["text"])
        assert ctx["passage_id"] != positive["passage_id"]
    hard_scores = [ctx["score"] for ctx in sample["hard_negative_ctxs"]]
    assert hard_scores == sorted(hard_scores, reverse=True) and all(score > 0 for score in hard_scores)


@pytest.fixture
def squad_file(tmp_path) -> Path:
    return write_squad(tmp_path / "squad.json")


def test_single_split_outputs(squad_file, tmp_path):
    written = convert_squad(str(squad_file), tmp_path / "out", num_hard_negatives=3, num_negatives=2)
    assert set(written) == {"psgs.tsv", "biencoder-train.json", "train.qa.csv"}
    rows = read_passages(written["psgs.tsv"])
    contexts = [context for paragraphs in ARTICLES.values() for context, _ in paragraphs]
    assert rows[0] == ["id", "text", "title"]
    assert [row[0] for row in rows[1:]] == [str(i) for i in range(1, len(contexts) + 1)]
    assert rows[1][2] == "Super Bowl 50"  # underscores of SQuAD titles become spaces
    assert rows[2][1] == "The halftime show was headlined by Coldplay, with Beyoncé and Bruno Mars as guests. " \
                         "It was watched widely."
    assert rows[4][1] == contexts[3] and '"Mermaid of Warsaw"' in rows[4][1]

    samples = json.loads(written["biencoder-train.json"].read_text(encoding="utf-8"))
    assert len(samples) == sum(len(qas) for paragraphs in ARTICLES.values() for _, qas in paragraphs)
    for sample in samples:
        check_sample_schema(sample)
        check_answers_and_negatives(sample, max_hard=3)
        assert sample["dataset"] == "squad1" and len(sample["negative_ctxs"]) <= 2
    assert samples[0]["answers"] == ["Levi's Stadium"]  # duplicates removed
    assert samples[0]["positive_ctxs"][0]["passage_id"] == "1"
    assert any(sample["hard_negative_ctxs"] for sample in samples)

    qas = read_qas(written["train.qa.csv"])
    assert qas == [(sample["question"], sample["answers"]) for sample in samples]
    assert ("What statue is the symbol of Warsaw?", ['"Mermaid of Warsaw"', "Mermaid of Warsaw"]) in qas


def test_conversion_is_deterministic(squad_file, tmp_path):
    first = convert_squad(str(squad_file), tmp_path / "a", dev_fraction=0.5, seed=3)
    second = convert_squad(str(squad_file), tmp_path / "b", dev_fraction=0.5, seed=3)
    for name in first:
        assert first[name].read_bytes() == second[name].read_bytes()


def test_article_split_keeps_articles_apart(squad_file, tmp_path):
    written = convert_squad(str(squad_file), tmp_path / "out", dev_fraction=0.5, seed=1)
    assert set(written) == {"psgs.tsv", "biencoder-train.json", "train.qa.csv", "biencoder-dev.json", "dev.qa.csv"}
    titles = {split: {sample["positive_ctxs"][0]["title"]
                      for sample in json.loads(written[f"biencoder-{split}.json"].read_text(encoding="utf-8"))}
              for split in ("train", "dev")}
    assert len(titles["train"]) == len(titles["dev"]) == 2 and not titles["train"] & titles["dev"]
    questions = [question for split in ("train", "dev") for question, _ in read_qas(written[f"{split}.qa.csv"])]
    assert len(questions) == len(set(questions)) == 9
    assert len(read_passages(written["psgs.tsv"])) == 1 + 8  # one collection over every article


def test_split_articles_bounds():
    assert len(split_articles(10, 0.01, seed=0)) == 1
    assert len(split_articles(3, 0.99, seed=0)) == 2
    with pytest.raises(ValueError):
        split_articles(1, 0.5, seed=0)


def test_entry_script(squad_file, tmp_path):
    subprocess.run([sys.executable, str(REPO_ROOT / "squad_to_dpr.py"), "--squad_file", str(squad_file),
                    "--output_dir", str(tmp_path / "out"), "--split_name", "dev", "--hard_negatives", "2"],
                   check=True, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    samples = json.loads((tmp_path / "out" / "biencoder-dev.json").read_text(encoding="utf-8"))
    assert len(samples) == 9 and all(len(sample["hard_negative_ctxs"]) <= 2 for sample in samples)


def test_real_squad_dev(shared_data, tmp_path):
    written = convert_squad(str(shared_data / "squad_open" / "reader-dev.json"), tmp_path, split_name="dev",
                            dataset="squad1.1-dev-open", num_hard_negatives=5, num_negatives=3)
    samples = json.loads(written["biencoder-dev.json"].read_text(encoding="utf-8"))
    assert len(samples) == 1427 and len(read_passages(written["psgs.tsv"])) == 1 + 312
    for sample in samples:
        check_sample_schema(sample)
        check_answers_and_negatives(sample, max_hard=5)
    assert sum(len(sample["hard_negative_ctxs"]) == 5 for sample in samples) > 0.9 * len(samples)
    assert len(read_qas(written["dev.qa.csv"])) == 1427


def test_bom_and_gzip_and_non_squad_files(squad_file, tmp_path):
    with_bom = tmp_path / "bom.json"
    with_bom.write_bytes(b"\xef\xbb\xbf" + squad_file.read_bytes())  # as some editors save it
    assert read_squad(with_bom) == read_squad(squad_file)
    compressed = tmp_path / "squad.json.gz"
    compressed.write_bytes(gzip.compress(squad_file.read_bytes()))
    assert read_squad(compressed) == read_squad(squad_file)
    not_squad = tmp_path / "list.json"
    not_squad.write_text("[]")
    with pytest.raises(DataFileError, match=r"list\.json: not a SQuAD file"):
        read_squad(not_squad)
