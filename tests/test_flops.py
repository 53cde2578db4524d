"""The model FLOPs the step records report count each row at its real length (its attention mask), not the
padded width of the batch."""
import pytest
import torch

from dpr.training.flops import ModelFlops
from tests.fixtures import write_retriever_json
from tests.tiny_models import tiny_bert_dir
from tests.training_helpers import compose_config, records_file, run_trainer, tiny_overrides


def test_flops_of_rows_of_known_lengths_match_the_hand_count(tmp_path):
    model = tiny_bert_dir(tmp_path / "bert", hidden=32, layers=2)
    from transformers import BertModel

    encoder = BertModel.from_pretrained(model)
    n = sum(p.numel() for name, p in encoder.named_parameters() if "embeddings" not in name and "pooler" not in name)
    mask = torch.zeros(3, 10, dtype=torch.long)
    for row, length in enumerate((10, 4, 1)):
        mask[row, :length] = 1
    trained = ModelFlops([(encoder, True)], torch.device("cpu"), "fp32")
    frozen = ModelFlops([(encoder, False)], torch.device("cpu"), "fp32")

    by_hand = sum(6 * n * t + 12 * 2 * 32 * t * t for t in (10, 4, 1))
    assert trained.of_sequences(0, mask) == pytest.approx(by_hand, rel=1e-12)
    assert frozen.of_sequences(0, mask) == pytest.approx(by_hand / 3, rel=1e-12)
    # the same rows padded wider, or stacked as the reader's (questions, passages, width), count the same
    wider = torch.cat([mask, torch.zeros(3, 7, dtype=torch.long)], dim=1)
    assert trained.of_sequences(0, wider) == trained.of_sequences(0, mask)
    assert trained.of_sequences(0, mask.reshape(3, 1, 10)) == trained.of_sequences(0, mask)


def test_trainer_records_the_same_flops_whatever_the_padding(tmp_path):
    """The same batches padded to their longest row and to sequence_length give the same recorded FLOPs
    (flops = tflops x seconds of each step record in training_records.jsonl)."""
    model = tiny_bert_dir(tmp_path / "bert", dropout=0.1)
    train = write_retriever_json(tmp_path / "train.json", 8)
    dev = write_retriever_json(tmp_path / "dev.json", 4)
    recorded = {}
    for pad_to_max in (False, True):
        out = tmp_path / f"pad_to_max_{pad_to_max}"
        cfg = compose_config(tiny_overrides(model, train, dev, str(out), encoder__pad_to_max=pad_to_max,
                                            encoder__sequence_length=64))
        trainer, _ = run_trainer(cfg)
        recorded[pad_to_max] = [r["tflops"] * r["seconds"] * 1e12 for r in records_file(out, "step")]
    assert len(recorded[False]) == 2 and all(f > 0 for f in recorded[False])
    assert recorded[True] == pytest.approx(recorded[False], rel=1e-9)
    # and that is less than the padded shape's count: the fixture's rows are shorter than 64 tokens
    padded = trainer.flops.of_sequences(0, torch.ones(4, 64)) + trainer.flops.of_sequences(1, torch.ones(8, 64))
    assert max(recorded[True]) < padded


def test_a_batch_without_sequences_costs_nothing():
    """A reader batch whose questions all lack a usable positive encodes nothing: 0 FLOPs, whatever its shape."""
    from dpr.training.flops import EncoderCost

    cost = EncoderCost(params=1000, layers_hidden=64, passes=3)
    for shape in ((0, 0), (0, 4, 0), (2, 0), (0, 7)):
        assert cost.flops(torch.zeros(shape)) == 0.0
