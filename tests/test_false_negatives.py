"""In-batch false negatives (train.in_batch_negatives): the mask itself, the masked loss against the loss without
the masked contexts, and the option's check. Chunking and world size: tests/test_grad_cache.py,
tests/test_training.py, tests/test_cli.py."""
import json
import runpy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dpr.data.biencoder_batch import make_biencoder_batch, sample_examples
from dpr.data.biencoder_data import SampledContexts
from dpr.data.passages import Passage
from dpr.evaluation.qa_validation import has_answer
from dpr.foundation.errors import ConfigError
from dpr.models.biencoder import nll_loss
from dpr.training.biencoder_trainer import BiEncoderSettings
from dpr.training.false_negatives import FalseNegativeMask
from tests.biencoder_helpers import false_negative_mask, gradients, make_model, run, tiny_setup, towers
from tests.fixtures import write_retriever_json
from tests.training_helpers import compose_config


def example(question, contexts, hard=()):
    return SampledContexts(question, [Passage(*c) for c in contexts], 0, list(hard))


# Three questions, two contexts each (positive first): the global batch's contexts are positions 0..5.
BATCH = [
    example("q0", [("1", "Paris is in France"), ("2", "Berlin, the capital")], [1]),
    example("q1", [("2", "Berlin, the capital"), ("1", "Paris is in France, again")], [1]),
    example("q2", [(None, "berlin,  THE capital"), (None, "Rome was founded in 753 BC")], [1]),
]
ANSWERS = [["France"], ["Berlin"], ["753 BC", "Rome"]]


def rows(mask):
    return [[j for j, m in enumerate(row) if m] for row in mask.tolist()]


def test_all_is_dpr_and_masks_nothing():
    assert FalseNegativeMask("all")(BATCH, ANSWERS) is None


def test_duplicates_by_passage_id_and_by_normalised_text_where_an_id_is_missing():
    mask = FalseNegativeMask("mask_duplicates")(BATCH, ANSWERS)
    assert mask.shape == (3, 6)
    assert rows(mask) == [
        [3],  # q0's gold passage (id 1) is q1's hard negative, another text of the same id
        [1, 4],  # q1's (id 2): q0's hard negative, and q2's positive, which has no id but the same uncased tokens
        [1, 2],  # q2's (no id): both contexts with its text, ids or not
    ]


def test_answers_mask_every_context_holding_an_answer_but_the_own_positive():
    mask = FalseNegativeMask("mask_answers")(BATCH, ANSWERS)
    assert rows(mask) == [
        [3],  # "France" is in q1's hard negative (and in q0's own positive, never masked)
        [1, 4],  # "Berlin": q0's hard negative and q2's positive (also duplicates)
        [1, 2, 5],  # its own hard negative holds "753 BC": masked too
    ]
    # the match is has_answer's (string), context by context
    contexts = [c for e in BATCH for c in e.contexts]
    positives = [0, 2, 4]
    for i, answers in enumerate(ANSWERS):
        expected = [j for j, c in enumerate(contexts) if j != positives[i] and has_answer(answers, c.text)]
        assert [j for j in rows(mask)[i] if j in expected] == expected


def test_answer_matches_stay_within_one_context():
    """The contexts' token keys are searched joined: an answer spanning the end of one and the start of the next,
    or an answer without tokens, matches nothing."""
    batch = [example("q0", [("a", "ends with Saint"), ("b", "Louis begins here")]),
             example("q1", [("c", "nothing"), ("d", "Saint Louis, Missouri")])]
    mask = FalseNegativeMask("mask_answers")(batch, [["Saint Louis", ""], [" "]])
    assert rows(mask) == [[3], []]
    assert not has_answer(["Saint Louis"], "ends with Saint") and has_answer(["Saint Louis"], "Saint Louis, Missouri")


def test_the_mask_of_the_fixture_batch_fires_where_gold_passages_repeat(tmp_path):
    """The fixture's question i+1's gold passage is question i's first hard negative (passage ids by topic)."""
    _, samples, _ = tiny_setup(tmp_path)
    examples = sample_examples(samples, range(4), 1, 0, shuffle=False)
    mask = FalseNegativeMask("mask_duplicates")(examples, [samples[i].answers for i in range(4)])
    # contexts: [positive, hard negative] per question; question i's hard negative is question i+1's positive
    assert rows(mask) == [[], [1], [3], [5]]


def test_masked_loss_equals_the_loss_without_the_masked_contexts(tmp_path):
    """The masked loss and its gradients are those of each question's softmax over the batch's contexts with its
    masked ones removed (the gradient cache on: the mask holds for chunks as for the full batch)."""
    model_dir, samples, tensorizer = tiny_setup(tmp_path)
    model = make_model(model_dir)
    indices = range(6)
    batch = make_biencoder_batch(samples, indices, tensorizer, 2, 1, shuffle=True, seed=3, epoch=1)
    masked = false_negative_mask("mask_answers", samples, indices, 2, 1, seed=3, epoch=1)
    assert masked.sum() >= 6
    loss, _, grads = run(model, batch, True, 2, 3, masked=masked)

    model.zero_grad(set_to_none=True)
    q_tower, ctx_tower = towers(model, batch, 10**6, 10**6)
    q, ctx = q_tower.encode(q_tower.inputs), ctx_tower.encode(ctx_tower.inputs)
    losses = []
    for i, positive in enumerate(batch.positive_indices.tolist()):
        kept = [j for j in range(ctx.shape[0]) if not masked[i, j]]
        scores = q[i] @ ctx[kept].T
        losses.append(-F.log_softmax(scores, dim=0)[kept.index(positive)])
    removed = torch.stack(losses).mean()
    removed.backward()
    assert loss == pytest.approx(float(removed.detach()), rel=1e-5)
    for name, g in gradients(model).items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
    # and the mask changed the loss: the comparison is not between two unmasked losses
    unmasked, _ = nll_loss(q.detach(), ctx.detach(), batch.positive_indices)
    assert float(unmasked) > loss + 1e-3


@pytest.mark.parametrize("value", ["all", "mask_duplicates", "mask_answers"])
def test_each_mode_resolves_into_the_settings(value):
    cfg = compose_config([f"train.in_batch_negatives={value}"])
    assert BiEncoderSettings.from_config(cfg).in_batch_negatives == value
    assert BiEncoderSettings.from_config(compose_config([])).in_batch_negatives == "all"  # DPR's


def test_a_wrong_mode_is_refused_in_one_line():
    with pytest.raises(ConfigError) as refused:
        BiEncoderSettings.from_config(compose_config(["train.in_batch_negatives=maybe"]))
    assert str(refused.value) == ("train.in_batch_negatives='maybe': choose one of all, mask_duplicates, "
                                  "mask_answers")


def test_the_count_script_counts_the_trainers_batches(tmp_path):
    """bench/count_false_negatives.py (the docs' squad_open numbers) on the fixture: 16 questions, batches of 4
    over two epochs; its counts are the masks' own, and mask_answers masks what mask_duplicates does and more."""
    count = runpy.run_path(str(Path(__file__).resolve().parents[1] / "bench" / "count_false_negatives.py"))["main"]
    data = write_retriever_json(tmp_path / "train.json", 16, topic_ids=True)
    result = count(["--data", data, "--batch_size", "4", "--batches", "6", "--out", str(tmp_path / "counts.json")])
    assert json.loads((tmp_path / "counts.json").read_text()) == result
    assert (result["batches"], result["epochs"], result["contexts_per_batch"]) == (6, 2, 8)
    duplicates, answers = result["modes"]["mask_duplicates"], result["modes"]["mask_answers"]
    assert 0 < duplicates["masked_pairs_per_batch"] < answers["masked_pairs_per_batch"]
    assert duplicates["questions_masked_per_batch"] <= answers["questions_masked_per_batch"] <= 4
