import json
import logging

import numpy as np
import pytest

from dpr.evaluation.qa_validation import (
    SimpleTokenizer,
    calculate_matches,
    cumulative_top_k_hits,
    format_validation_results,
    has_answer,
    retrieval_results_records,
    top_k_accuracy_from_results,
    top_k_hits_from_results,
    write_retrieval_results,
)


def test_tokenizer_splits_word_runs_and_single_symbols():
    tokens = SimpleTokenizer().words("Hello, World's 3.5km café!", uncased=True)
    assert tokens == ["hello", ",", "world", "'", "s", "3", ".", "5km", "café", "!"]


def test_tokenizer_keeps_case_unless_uncased():
    assert SimpleTokenizer().words("New York") == ["New", "York"]


@pytest.mark.parametrize(
    "answers, text",
    [
        (["May 18 , 2018"], "Deadpool 2 was released on May 18, 2018 in the US."),  # DPR's tokenised answers
        (["new york"], "He moved to NEW YORK City."),
        (["Wilhelm Conrad Röntgen"], "The first prize went to WILHELM CONRAD RÖNTGEN."),
        (["Röntgen"], "Wilhelm Conrad Ro\u0308ntgen"),  # composed answer, decomposed text: NFD on both
        (["U.S."], "the U.S. army"),
        (["no", "Barack Obama"], "President Barack Obama said"),
    ],
)
def test_string_match_finds_answers(answers, text):
    assert has_answer(answers, text, "string")


@pytest.mark.parametrize(
    "answers, text",
    [
        (["York"], "Yorkshire pudding"),  # tokens, not substrings
        (["Röntgen"], "Wilhelm Conrad Rontgen"),  # accents are kept, only normalised
        (["May 18, 2019"], "May 18, 2018"),
        (["Barack Obama"], "Obama Barack"),
        (["", "  "], "any text at all"),  # an answer without tokens never matches
    ],
)
def test_string_match_rejects_non_answers(answers, text):
    assert not has_answer(answers, text, "string")


def test_regex_match():
    assert has_answer([r"\d{4}\s+olympics"], "The 1936 OLYMPICS took place in Berlin", "regex")
    assert has_answer([r"Ro\u0308ntgen|Roentgen"], "Röntgen rays", "regex")
    assert not has_answer([r"^Berlin"], "The games took place in Berlin", "regex")
    assert has_answer([r"^Berlin"], "The games took place\nBerlin, 1936", "regex")  # MULTILINE


def test_invalid_regex_is_no_match_not_an_error():
    assert not has_answer(["(unclosed", "[a-"], "(unclosed [a- text", "regex")
    assert has_answer(["(unclosed", "clo"], "(unclosed", "regex")


def test_unknown_match_type_is_rejected():
    with pytest.raises(ValueError, match="match_type"):
        has_answer(["a"], "a", "kilt-ish")


def test_cumulative_top_k_hits():
    hits = [[False, True, False], [True, True, False], [False, False, False], [False, False, True]]
    assert cumulative_top_k_hits(hits, 3) == [1, 2, 3]


PASSAGES = {
    "wiki:1": ("Paris is the capital of France.", "Paris"),
    "wiki:2": ("Berlin is the capital of Germany.", "Berlin"),
    "wiki:3": ("The Seine flows through Paris.", "Seine"),
    "wiki:4": ("Madrid is in Spain.", "Madrid"),
    "wiki:5": (None, "Broken"),
}
ANSWERS = [["Paris"], ["Germany"], ["Lisbon"], ["Spain"], ["France"]]
CLOSEST = [
    (["wiki:2", "wiki:1", "wiki:3"], np.array([3.0, 2.0, 1.0], dtype=np.float32)),
    (["wiki:2", "wiki:4", "wiki:1"], np.array([5.5, 1.25, 0.5], dtype=np.float32)),
    (["wiki:1", "wiki:2", "wiki:3"], np.array([1.0, 0.9, 0.8], dtype=np.float32)),
    (["wiki:1", "wiki:2", "wiki:4"], np.array([1.0, 0.9, 0.8], dtype=np.float32)),
    (["wiki:5", "wiki:1", "wiki:2"], np.array([1.0, 0.9, 0.8], dtype=np.float32)),
]


def test_calculate_matches_hand_made_case(caplog):
    with caplog.at_level(logging.WARNING):
        stats = calculate_matches(PASSAGES, ANSWERS, CLOSEST, workers=1)
    assert stats.questions_doc_hits == [
        [False, True, True],
        [True, False, False],
        [False, False, False],
        [False, False, True],
        [False, True, False],  # a passage without text is a miss, with a warning
    ]
    assert stats.top_k_hits == [1, 3, 4]
    assert "wiki:5" in caplog.text


def test_calculate_matches_missing_id_raises():
    with pytest.raises(KeyError):
        calculate_matches(PASSAGES, [["x"]], [(["wiki:99"], [1.0])], workers=1)


def test_spawn_pool_equals_inline():
    answers = ANSWERS * 8
    closest = CLOSEST * 8
    inline = calculate_matches(PASSAGES, answers, closest, workers=1, match_type="string")
    pooled = calculate_matches(PASSAGES, answers, closest, workers=2, match_type="string", start_method="spawn")
    assert pooled == inline


def test_format_validation_results_has_raw_lines_and_table():
    report = format_validation_results([1, 3, 4], 5)
    lines = report.splitlines()
    assert lines[0] == "Validation results: top k documents hits [1, 3, 4]"
    assert lines[1] == "Validation results: top k documents hits accuracy [0.2, 0.6, 0.8]"
    table_ks = [line.split("|")[0].strip() for line in lines[3:]]
    assert table_ks == ["1"]  # only the reported k that exist among the 3 docs
    assert "20.00%" in lines[3]


def test_results_json_format_and_recompute(tmp_path):
    stats = calculate_matches(PASSAGES, ANSWERS[:2], CLOSEST[:2], workers=1)
    questions = ["where is the capital of france?", "which country has berlin?"]
    records = retrieval_results_records(questions, ANSWERS[:2], PASSAGES, CLOSEST[:2], stats.questions_doc_hits)
    out = tmp_path / "sub" / "results.json"
    write_retrieval_results(out, records)

    raw = out.read_text(encoding="utf-8")
    assert raw == json.dumps(records, indent=4) + "\n"
    loaded = json.loads(raw)
    assert [list(record) for record in loaded] == [["question", "answers", "ctxs"]] * 2
    first_ctx = loaded[0]["ctxs"][0]
    assert list(first_ctx) == ["id", "title", "text", "score", "has_answer"]
    assert first_ctx == {
        "id": "wiki:2",
        "title": "Berlin",
        "text": "Berlin is the capital of Germany.",
        "score": "3.0",
        "has_answer": False,
    }
    assert [ctx["score"] for ctx in loaded[1]["ctxs"]] == ["5.5", "1.25", "0.5"]
    assert all(isinstance(ctx["has_answer"], bool) for record in loaded for ctx in record["ctxs"])

    assert top_k_hits_from_results(out) == ([1, 2, 2], 2)
    assert top_k_accuracy_from_results(out) == [0.5, 1.0, 1.0]


def test_score_string_is_float32_text():
    records = retrieval_results_records(["q"], [["a"]], PASSAGES, [(["wiki:1"], [0.1])], [[False]])
    assert records[0]["ctxs"][0]["score"] == str(np.float32(0.1)) == "0.1"


def test_real_nq_answers_tokenised_by_dpr(shared_data):
    with open(shared_data / "qas" / "nq-test.qa.csv", encoding="utf-8") as reader:
        rows = [line.rstrip("\n").split("\t") for line in reader]
    deadpool = next(answers for question, answers in rows if question.startswith("when is the next deadpool"))
    assert deadpool == "['May 18 , 2018']"
    assert has_answer(["May 18 , 2018"], "Deadpool 2 is scheduled for release on May 18, 2018.", "string")


def test_real_squad_positives_contain_their_answers(shared_data):
    with open(shared_data / "squad_open" / "biencoder-dev.json", encoding="utf-8") as reader:
        samples = json.load(reader)[:300]
    found = [has_answer(sample["answers"], sample["positive_ctxs"][0]["text"]) for sample in samples]
    assert sum(found) / len(found) >= 0.98
