"""Reading DPR retriever JSON, sampling, tensorization and batching."""
import gzip
import json

import numpy as np
import pytest
import torch

from dpr.data.batching import evaluation_batches, local_slice, training_batches
from dpr.data.biencoder_batch import make_biencoder_batch
from dpr.data.biencoder_data import BiEncoderSample, load_biencoder_samples, sample_contexts
from dpr.data.data_files import DataFileError
from dpr.data.passages import Passage
from dpr.data.tensorizer import Tensorizer
from dpr.models.hf_encoder import build_encoder, encode, load_tokenizer
from tests.fixtures import retriever_samples, write_retriever_json
from tests.tiny_models import tiny_bert_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_bert_dir(tmp_path_factory.mktemp("bert") / "m", dropout=0.1)


def test_json_jsonl_gzip_and_globs(tmp_path):
    write_retriever_json(tmp_path / "a.json", 3)
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(s) for s in retriever_samples(2)) + "\n\n")
    samples = load_biencoder_samples([str(tmp_path / "*.json"), str(tmp_path / "b.jsonl.gz")])
    assert len(samples) == 5 and samples[0].positive_passages[0].title == "paris"


def test_invalid_json_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"question": "q",\n "positive_ctxs": [}]')
    with pytest.raises(DataFileError, match=r"bad.json: not valid JSON at line 2"):
        load_biencoder_samples([str(bad)])
    lines = tmp_path / "bad.jsonl"
    lines.write_text(json.dumps(retriever_samples(1)[0]) + "\n{oops\n")
    with pytest.raises(DataFileError, match=r"bad.jsonl: line 2 is not valid JSON"):
        load_biencoder_samples([str(lines)])


def test_malformed_record_names_the_record(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(retriever_samples(2) + [{"question": "q", "positive_ctxs": [{"title": "no text"}]}]))
    with pytest.raises(DataFileError, match=r"bad.json: record 2: a passage without a 'text'"):
        load_biencoder_samples([str(bad)])


def test_records_without_question_or_positive_are_skipped_and_counted(tmp_path, caplog):
    records = retriever_samples(2) + [{"question": "q", "positive_ctxs": []}, {"positive_ctxs": [{"text": "t"}]}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(records))
    assert len(load_biencoder_samples([str(path)])) == 2
    assert "skipped 2 records without a question or without positive_ctxs" in caplog.text


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an existing file"):
        load_biencoder_samples([str(tmp_path / "none*.json")])


def sample(n_neg=4, n_hard=3):
    return BiEncoderSample(
        "q", ["a"], [Passage(None, "p0", "t"), Passage(None, "p1", "t")],
        [Passage(None, f"n{i}") for i in range(n_neg)], [Passage(None, f"h{i}") for i in range(n_hard)],
    )


def test_sampling_order_and_hard_negative_indices_with_other_negatives():
    s = sample_contexts(sample(), hard_negatives=2, other_negatives=1, shuffle=False)
    assert [c.text for c in s.contexts] == ["p0", "n0", "h0", "h1"]
    assert s.positive_index == 0 and s.hard_negative_indices == [2, 3]  # DPR #92 gets [1, 2]


def test_hard_negative_fallback_to_random_negatives():
    s = sample_contexts(sample(n_hard=0), hard_negatives=2, other_negatives=0, shuffle=False)
    assert [c.text for c in s.contexts] == ["p0", "n0", "n1"]


def test_shuffled_sampling_depends_on_seed_epoch_and_index_only(tmp_path):
    samples = [sample(n_neg=8, n_hard=8) for _ in range(6)]
    tok = None  # tensorization is not needed to compare the sampled texts

    def texts(seed, epoch, index):
        rng = np.random.default_rng(__import__("dpr.data.biencoder_data", fromlist=["x"]).example_seed(seed, epoch, index))
        return [c.text for c in sample_contexts(samples[index], 2, 2, True, rng, shuffle_positives=True).contexts]

    assert texts(1, 0, 3) == texts(1, 0, 3)
    assert len({tuple(texts(1, e, 3)) for e in range(6)}) > 1
    del tok


def test_batches_are_the_same_on_one_or_several_processes():
    one = training_batches([50], 8, seed=3, epoch=2)
    again = training_batches([50], 8, seed=3, epoch=2)
    assert len(one) == 6 and all((a.indices == b.indices).all() for a, b in zip(one, again))
    for gb in one:
        parts = [local_slice(gb, r, 2) for r in range(2)]
        assert [len(p) for p in parts] == [4, 4]
        assert np.concatenate(parts).tolist() == gb.indices.tolist()
    assert not all((a.indices == b.indices).all() for a, b in zip(one, training_batches([50], 8, seed=3, epoch=3)))


def test_multi_dataset_batches_are_homogeneous_and_rates_scale_them():
    batches = training_batches([20, 8], 4, seed=0, epoch=0, sampling_rates=[1, 2])
    assert sum(b.dataset_index == 0 for b in batches) == 5 and sum(b.dataset_index == 1 for b in batches) == 4
    assert all(b.indices.max() < (20 if b.dataset_index == 0 else 8) for b in batches)
    assert [len(b.indices) for b in evaluation_batches(10, 4)] == [4, 4, 2]


def test_tensorization_format(model_dir):
    tokenizer = load_tokenizer(model_dir)
    t = Tensorizer(tokenizer, 16, pad_to_max=True)
    ids, mask = t.tensorize(["ab cd"], ["xy"])
    tokens = tokenizer.convert_ids_to_tokens(ids[0])
    assert tokens[:9] == ["[CLS]", "x", "##y", "[SEP]", "a", "##b", "c", "##d", "[SEP]"]
    assert tokens[9:] == ["[PAD]"] * 7 and mask[0].tolist() == [1] * 9 + [0] * 7
    long_ids, _ = t.tensorize(["word " * 40])
    assert long_ids.shape == (1, 16) and tokenizer.convert_ids_to_tokens(int(long_ids[0, -1])) == "[SEP]"


def test_dynamic_padding_gives_the_vectors_of_fixed_padding(model_dir):
    tokenizer = load_tokenizer(model_dir)
    model = build_encoder(model_dir).eval()
    texts, titles = ["a short one", "a somewhat longer passage of text here", "mid size text"], ["t", None, "title"]
    fixed = Tensorizer(tokenizer, 64, pad_to_max=True).tensorize(texts, titles)
    dynamic = Tensorizer(tokenizer, 64).tensorize(texts, titles)
    assert fixed[0].shape[1] == 64 and dynamic[0].shape[1] < 64
    with torch.no_grad():
        torch.testing.assert_close(encode(model, *dynamic)[1], encode(model, *fixed)[1], rtol=1e-5, atol=1e-5)


def test_batch_positions_and_seeds(model_dir):
    samples = load_biencoder_samples([write_retriever_json(__import__("pathlib").Path(model_dir) / "s.json", 4)])
    t = Tensorizer(load_tokenizer(model_dir), 32)
    batch = make_biencoder_batch(samples, [2, 0], t, hard_negatives=2, other_negatives=1, shuffle=True, seed=1)
    assert batch.positive_indices.tolist() == [0, 4] and batch.hard_negative_indices == [[2, 3], [6, 7]]
    assert len(batch.question_seeds) == 2 and len(batch.context_seeds) == 8 == batch.context_ids.shape[0]
    assert make_biencoder_batch(samples, [2, 0], t, 2, 1, shuffle=False).question_seeds is None
