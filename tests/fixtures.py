"""Small DPR retriever training files written by the tests."""
import json
import os
from pathlib import Path
from typing import List

TOPICS = [
    ("paris", "france", "paris is the capital of france and its largest city"),
    ("berlin", "germany", "berlin is the capital of germany on the river spree"),
    ("rome", "italy", "rome is the capital of italy founded on seven hills"),
    ("madrid", "spain", "madrid is the capital of spain in the centre of the country"),
    ("lisbon", "portugal", "lisbon is the capital of portugal on the atlantic coast"),
    ("vienna", "austria", "vienna is the capital of austria on the danube"),
    ("oslo", "norway", "oslo is the capital of norway at the head of a fjord"),
    ("dublin", "ireland", "dublin is the capital of ireland on the liffey"),
    ("athens", "greece", "athens is the capital of greece and an ancient city"),
    ("warsaw", "poland", "warsaw is the capital of poland on the vistula"),
    ("prague", "czechia", "prague is the capital of czechia on the vltava"),
    ("bern", "switzerland", "bern is the capital of switzerland on the aare"),
]


def retriever_samples(n: int, topic_ids: bool = False) -> List[dict]:
    """n questions on the TOPICS in turn. With topic_ids each passage's id names its text (the same passage has
    the same id wherever it appears: question i's gold passage is question i-1's first hard negative), as in real
    data; without, positives are numbered by question and negatives share the ids n, h1 and h2."""
    samples = []
    for i in range(n):
        city, country, text = TOPICS[i % len(TOPICS)]
        other = TOPICS[(i + 1) % len(TOPICS)]
        third = TOPICS[(i + 5) % len(TOPICS)]
        ids = ([f"t{i % len(TOPICS)}", f"t{(i + 5) % len(TOPICS)}", f"t{(i + 1) % len(TOPICS)}",
                f"t{(i + 5) % len(TOPICS)}-again"] if topic_ids else [str(i), "n", "h1", "h2"])
        samples.append({
            "dataset": "fixture",
            "question": f"what is the capital of {country} {i}?",
            "answers": [city],
            "positive_ctxs": [{"title": city, "text": text, "score": 1.0, "title_score": 0, "passage_id": ids[0]}],
            "negative_ctxs": [{"title": third[0], "text": third[2], "score": 0, "title_score": 0, "passage_id": ids[1]}],
            "hard_negative_ctxs": [
                {"title": other[0], "text": other[2], "score": 0, "title_score": 0, "passage_id": ids[2]},
                {"title": third[0], "text": third[2] + " again", "score": 0, "title_score": 0, "passage_id": ids[3]},
            ],
        })
    return samples


def write_retriever_json(path: Path, n: int, topic_ids: bool = False) -> str:
    path.write_text(json.dumps(retriever_samples(n, topic_ids)))
    return str(path)


class PickledPayload:
    """What a malicious pickle carries: unpickling it runs `touch marker`, so a test can tell whether it ran."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def retriever_results(n: int, passages_per_question: int) -> list:
    """DPR's retriever results JSON: each question's passages ranked from the one holding its answer."""
    from dpr.evaluation.qa_validation import has_answer

    records = []
    for i in range(n):
        city, country, _ = TOPICS[i % len(TOPICS)]
        ctxs = []
        for j in range(passages_per_question):
            title, _, text = TOPICS[(i + j) % len(TOPICS)]
            ctxs.append({"id": str((i + j) % len(TOPICS)), "title": title, "text": text, "score": str(9.5 - j),
                         "has_answer": has_answer([city], text)})
        records.append({"question": f"what is the capital of {country}?", "answers": [city], "ctxs": ctxs})
    return records


def forbid_calls(monkeypatch, *targets: str) -> None:
    """Each function named (as monkeypatch.setattr takes it) fails the test when called: the work it starts must
    not begin, e.g. before every option has been checked."""
    def forbidden(*args, **kwargs):
        raise AssertionError("work started that should not have")

    for target in targets:
        monkeypatch.setattr(target, forbidden)


def assert_same_but_float_noise(actual, expected, rel: float = 1e-5, abs_: float = 1e-6, where: str = "") -> None:
    """Two JSON values equal in structure, order, strings and integers, their floats equal to float noise: the
    outputs of two processes, whose thread counts and kernels change the last bits of a score (never a ranking)."""
    if isinstance(expected, float) or isinstance(actual, float):
        assert isinstance(actual, (int, float)) and isinstance(expected, (int, float)), where
        assert abs(actual - expected) <= max(abs_, rel * abs(expected)), f"{where}: {actual} != {expected}"
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and list(actual) == list(expected), f"{where}: keys differ"
        for key, value in expected.items():
            assert_same_but_float_noise(actual[key], value, rel, abs_, f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), f"{where}: lengths differ"
        for index, (item, expected_item) in enumerate(zip(actual, expected)):
            assert_same_but_float_noise(item, expected_item, rel, abs_, f"{where}[{index}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def written_by_training(*names: str) -> list:
    """What a training run leaves in its output_dir besides `names`: the `tensorboard` folder where the tensorboard
    extra is installed (CI installs it)."""
    import importlib.util
    return sorted([*names, *(["tensorboard"] if importlib.util.find_spec("tensorboard") else [])])
