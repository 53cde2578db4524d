import gzip
import json

import pytest

from dpr.data.data_files import DataFileError
from dpr.data.qa_data import QASample, read_qa_csv, read_qa_file, read_qa_jsonl

QAS_CSV = (
    "who got the first nobel prize in physics\t['Wilhelm Conrad Röntgen']\n"
    "when is the next deadpool movie being released\t['May 18 , 2018']\n"
    'which mode is used for short wave broadcast service\t["Olivia", "MFSK"]\n'
)


def test_read_qa_csv(tmp_path):
    path = tmp_path / "nq.qa.csv"
    path.write_text(QAS_CSV, encoding="utf-8")
    assert read_qa_csv(path) == [
        QASample("who got the first nobel prize in physics", ["Wilhelm Conrad Röntgen"]),
        QASample("when is the next deadpool movie being released", ["May 18 , 2018"]),
        QASample("which mode is used for short wave broadcast service", ["Olivia", "MFSK"]),
    ]


def test_read_qa_csv_columns_and_gzip(tmp_path):
    path = tmp_path / "q.qa.csv.gz"
    with gzip.open(path, "wt", encoding="utf-8") as writer:
        writer.write("q7\t['a', 'b']\twhat is it?\n")
    assert read_qa_file(path, question_col=2, answers_col=1, id_col=0) == [QASample("what is it?", ["a", "b"], "q7")]


def test_answers_are_never_evaluated(tmp_path):
    path = tmp_path / "evil.qa.csv"
    path.write_text("fine\t['x']\nevil\t__import__('os').getcwd()\n", encoding="utf-8")
    with pytest.raises(DataFileError, match=r"evil\.qa\.csv, line 2"):
        read_qa_csv(path)


@pytest.mark.parametrize(
    "line, message",
    [
        ("only a question", "columns"),
        ("q\t['unterminated", "literal"),
        ("q\t[1, 2]", "list of strings"),
    ],
)
def test_malformed_csv_row_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.qa.csv"
    path.write_text(f"ok\t['a']\n\n{line}\n", encoding="utf-8")
    with pytest.raises(DataFileError, match=rf"bad\.qa\.csv, line 3: .*{message}"):
        read_qa_csv(path)


def test_read_qa_jsonl_list_and_string_answers(tmp_path):
    path = tmp_path / "q.jsonl"
    lines = [
        json.dumps({"question": "capital of france?", "answer": ["Paris", "paris"]}),
        "",
        json.dumps({"question": "2+2?", "answer": "4", "id": 17}),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert read_qa_file(path) == [
        QASample("capital of france?", ["Paris", "paris"]),
        QASample("2+2?", ["4"], "17"),
    ]


def test_read_qa_jsonl_gz(tmp_path):
    path = tmp_path / "q.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as writer:
        writer.write(json.dumps({"question": "q", "answer": "a"}) + "\n")
    assert read_qa_file(path) == [QASample("q", ["a"])]


@pytest.mark.parametrize(
    "line, message",
    [("{not json", "not valid JSON"), ('{"answer": "a"}', "'question'"), ('{"question": "q"}', "'answer'")],
)
def test_malformed_jsonl_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataFileError, match=rf"bad\.jsonl, line 2: .*{message}"):
        read_qa_jsonl(path)


def test_real_nq_test_questions(shared_data):
    samples = read_qa_file(shared_data / "qas" / "nq-test.qa.csv")
    assert len(samples) == 3610
    assert samples[0] == QASample("who got the first nobel prize in physics", ["Wilhelm Conrad Röntgen"])
    assert samples[1].answers == ["May 18 , 2018"]
    assert samples[2].answers == ["Olivia", "MFSK"]
    assert all(sample.answers and all(isinstance(a, str) for a in sample.answers) for sample in samples)


def test_real_squad_open_dev_questions(shared_data):
    samples = read_qa_file(shared_data / "squad_open" / "dev.qa.csv")
    assert len(samples) == 1427
    assert samples[0].answers == ["Nobel Prize"]
