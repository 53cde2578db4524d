"""Validation by retrieval (train.val_retrieval): MRR@10 and Recall@k equal ir-measures' on the same ranking, ties
included; the corpus is fixed by its seed and holds every positive and hard negative once; 2 processes give the
values and the best checkpoint of 1, and the encoding batch changes nothing; off, records and validations are as
before."""
import os
import subprocess
import sys
from pathlib import Path

import ir_measures
import pytest
import torch
from ir_measures import R, RR

from dpr.data.biencoder_data import BiEncoderSample
from dpr.data.passages import Passage
from dpr.evaluation.rank_metrics import MRR_CUTOFF, MRR_NAME, metric_sums, recall_name, relevant_ranks
from dpr.training import retrieval_validation
from dpr.training.biencoder_trainer import BiEncoderTrainer
from dpr.training.false_negatives import same_passages
from dpr.training.retrieval_validation import RetrievalValidationSettings, build_retrieval_corpus, ranking_sums
from tests.fixtures import forbid_calls, write_retriever_json
from tests.tiny_models import tiny_bert_dir
from tests.training_helpers import compose_config, records_file, run_trainer, tiny_overrides

REPO = Path(__file__).resolve().parents[1]
# the keys of a validation record before retrieval validation (what existing readers of the records file see)
RECORD_KEYS = ["epoch", "offset", "step", "metric", "value", "seconds", "checkpoint", "best"]
# Mean pooling of the tiny model below: its scores at each relevant passage are apart from every other passage's by
# more than 1e-4 of their size (random [CLS] vectors are all alike: scores tie to the last float bit, and float noise
# would reorder them); test_the_encoding_batch_changes_nothing checks it.
MODEL = dict(encoder__pooling="mean")
RETRIEVAL = dict(MODEL, train__val_retrieval="true", val_av_rank_start_epoch=0, train__val_retrieval_recall_at="[1,3,10]",
                 train__val_retrieval_other_passages=3)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("val_retrieval")
    return {
        "model": tiny_bert_dir(folder / "bert", dropout=0.1, hidden=64, seed=2),
        "train": write_retriever_json(folder / "train.json", 16),
        # 5 questions (uneven parts on 2 processes); passage ids by topic: question i's positive is question i-1's
        # hard negative, so the corpus keeps shared passages once
        "dev": write_retriever_json(folder / "dev.json", 5, topic_ids=True),
    }


# ------------------------------------------------------------------------------------------- the measures
def ir_measures_values(scores: torch.Tensor, relevant, recall_at, tie_rule: bool):
    """ir-measures' RR@10 and R@k of the same scores (its default pipeline: the pytrec_eval provider alone has no
    RR cutoff, and gives the uncut RR for RR@10). With `tie_rule` ir-measures gets the order of rank_metrics' tie
    rule (score descending, non-relevant passages first among ties, then corpus order) as distinct scores, since
    its providers order ties by docid, each by its own rule."""
    run, qrels = {}, {}
    for q, (row, positives) in enumerate(zip(scores.tolist(), relevant)):
        if tie_rule:
            order = sorted(range(len(row)), key=lambda j: (-row[j], j in positives, j))
            row = [0.0] * len(row)
            for place, j in enumerate(order):
                row[j] = float(len(order) - place)
        run[f"q{q}"] = {f"d{j}": score for j, score in enumerate(row)}
        qrels[f"q{q}"] = {f"d{j}": 1 for j in positives}
    measures = [RR @ MRR_CUTOFF] + [R @ k for k in recall_at]
    values = ir_measures.calc_aggregate(measures, qrels, run)
    return {MRR_NAME: values[RR @ MRR_CUTOFF], **{recall_name(k): values[R @ k] for k in recall_at}}


def our_values(scores: torch.Tensor, relevant, recall_at):
    sums = metric_sums(relevant_ranks(scores, relevant), torch.tensor([len(r) for r in relevant]), recall_at)
    return {name: total / scores.shape[0] for name, total in sums.items()}


def test_mrr_and_recall_equal_ir_measures_with_ties():
    generator = torch.Generator().manual_seed(0)
    questions, passages, recall_at = 40, 60, (1, 3, 5, 20)
    # few distinct scores: most relevant passages tie with non-relevant ones
    scores = torch.randint(0, 6, (questions, passages), generator=generator).float() / 4
    relevant = [sorted(torch.randperm(passages, generator=generator)[: 1 + q % 4].tolist()) for q in range(questions)]
    tied = sum(int(((scores[q] == scores[q, r]).sum() > 1)) for q in range(questions) for r in relevant[q])
    assert tied > 20
    # and some question's first relevant passage ranks below the cutoff, where RR@10 is 0 and the uncut RR is not
    assert any(min(ranks) > MRR_CUTOFF for ranks in relevant_ranks(scores, relevant).tolist())
    ours, theirs = our_values(scores, relevant, recall_at), ir_measures_values(scores, relevant, recall_at, True)
    assert list(ours) == list(theirs)
    for name in ours:
        assert abs(ours[name] - theirs[name]) <= 1e-9, (name, ours[name], theirs[name])
    # and on distinct scores, where no tie rule is involved
    scores = torch.rand((questions, passages), generator=generator)
    ours, theirs = our_values(scores, relevant, recall_at), ir_measures_values(scores, relevant, recall_at, False)
    assert all(abs(ours[name] - theirs[name]) <= 1e-9 for name in ours)


def test_a_tie_ranks_the_relevant_passage_last():
    """Every passage scored alike: the relevant one ranks after the 11 others, whatever its corpus position."""
    scores = torch.zeros((2, 12))
    ranks = relevant_ranks(scores, [[0], [5, 11]])
    assert ranks.tolist() == [[12.0, float("inf")], [11.0, 12.0]]
    values = our_values(scores, [[0], [5, 11]], (1, 11))
    assert values == {MRR_NAME: 0.0, "recall@1": 0.0, "recall@11": 0.25}


def test_ranking_in_chunks_of_questions_gives_the_same_sums(monkeypatch):
    generator = torch.Generator().manual_seed(1)
    questions, passages = torch.randn((9, 8), generator=generator), torch.randn((30, 8), generator=generator)
    relevant = [[q % 30, (3 * q + 1) % 30] for q in range(9)]
    whole = ranking_sums(questions, passages, relevant, (1, 5), lambda q, c: q @ c.T)
    monkeypatch.setattr(retrieval_validation, "SCORES_PER_CHUNK", 2 * 30)  # two questions at a time
    assert ranking_sums(questions, passages, relevant, (1, 5), lambda q, c: q @ c.T) == whole
    assert whole[-1] == 9 and 0 < whole[0] < 9


# ------------------------------------------------------------------------------------------- the corpus
def corpus_samples():
    """6 questions, each with 2 positives, 2 hard negatives and 8 negatives of its own; question q's first hard
    negative is question q+1's first positive (the same id), and question 0's second positive appears without an
    id, cased otherwise, among question 5's hard negatives."""
    samples = []
    for q in range(6):
        positives = [Passage(f"p{q}", f"passage {q} one", "t"), Passage(f"p{q}b", f"passage {q} two", "t")]
        hard = [Passage(f"p{(q + 1) % 6}", f"passage {(q + 1) % 6} one", "t"), Passage(f"h{q}", f"hard {q}", "t")]
        if q == 5:
            hard.append(Passage(None, "Passage 0  TWO", "t"))
        negatives = [Passage(f"n{q}-{j}", f"negative {q} {j}", "t") for j in range(8)]
        samples.append(BiEncoderSample(f"question {q}?", ["a"], positives, negatives, hard))
    return samples


def settings(**changes):
    values = dict(other_passages=10, recall_at=(1, 5, 20, 100), seed=0, max_questions=None)
    values.update(changes)
    return RetrievalValidationSettings(**values)


def test_the_corpus_holds_every_positive_and_hard_negative_once_and_its_draw_follows_the_seed():
    samples = corpus_samples()
    corpus = build_retrieval_corpus(samples, settings())
    same = same_passages(corpus.passages)
    assert all(same(i) == [i] for i in range(len(corpus.passages)))  # no passage twice
    # 12 positives and 6 hard negatives of their own (the others are positives; the id-less copy is p0b)
    assert corpus.judged == 18 and corpus.others_available == 48 and len(corpus.passages) == 18 + 10
    for q, sample in enumerate(samples):
        for passage in sample.positive_passages + sample.hard_negative_passages:
            matches = [i for i in range(corpus.judged) if corpus.passages[i].id == passage.id]
            assert len(matches) == 1 or passage.id is None
        # relevant: the question's own positives, by identity
        assert sorted(corpus.passages[i].id for i in corpus.relevant[q]) == sorted(p.id for p in sample.positive_passages)
    assert all(p.id.startswith("n") for p in corpus.passages[corpus.judged:])
    assert corpus.recall_at == (1, 5, 20)  # 100 is deeper than the corpus of 28
    again = build_retrieval_corpus(samples, settings())
    assert (again.passages, again.relevant, again.questions) == (corpus.passages, corpus.relevant, corpus.questions)
    other_seed = build_retrieval_corpus(samples, settings(seed=1))
    assert other_seed.passages[:18] == corpus.passages[:18] and other_seed.relevant == corpus.relevant
    assert set(other_seed.passages[18:]) != set(corpus.passages[18:])


def test_the_id_less_copy_of_a_positive_is_relevant_where_it_is_kept():
    """Question 5 alone (a sample of one): its hard negative without an id is the same passage as question 0's
    positive p0b, which is not in the corpus; kept as a hard negative, it is not relevant to question 5."""
    samples = corpus_samples()
    corpus = build_retrieval_corpus(samples[5:], settings(other_passages=0))
    assert [p.text for p in corpus.passages] == ["passage 5 one", "passage 5 two", "passage 0 one", "hard 5",
                                                 "Passage 0  TWO"]
    assert corpus.relevant == [[0, 1]]
    # with question 0 first, the copy is p0b's and leaves the corpus: one passage, relevant to question 0
    corpus = build_retrieval_corpus([samples[0], samples[5]], settings(other_passages=0))
    assert [p.id for p in corpus.passages] == ["p0", "p0b", "p1", "h0", "p5", "p5b", "h5"]
    assert corpus.relevant == [[0, 1], [4, 5]]


def test_a_sample_of_questions_follows_the_seed():
    samples = corpus_samples()
    first = build_retrieval_corpus(samples, settings(max_questions=3))
    assert len(first.questions) == 3 and first.questions == sorted(first.questions)  # in file order
    assert build_retrieval_corpus(samples, settings(max_questions=3)).questions == first.questions
    seeds = {tuple(build_retrieval_corpus(samples, settings(max_questions=3, seed=s)).questions) for s in range(6)}
    assert len(seeds) > 1


# ------------------------------------------------------------------------------------------- training
def trainer(data, tmp_path, **extra):
    return BiEncoderTrainer(compose_config(tiny_overrides(data["model"], data["train"], data["dev"], str(tmp_path),
                                                          **extra)))


def min_relative_gap_at_relevant(trainer) -> float:
    """The smallest score difference between a relevant passage and any other passage of its question, relative to
    the question's largest score: what float noise would have to exceed to change a rank that the measures see."""
    corpus = trainer.retrieval_corpus
    with torch.no_grad():
        trainer.model.eval()
        scores = trainer._encode_questions(corpus.questions) @ trainer._encode_passages(corpus.passages).T
    gaps = []
    for row, relevant in zip(scores, corpus.relevant):
        for r in relevant:
            others = torch.ones_like(row, dtype=torch.bool)
            others[r] = False
            gaps.append(float((row[others] - row[r]).abs().min() / row.abs().max()))
    return min(gaps)


def test_the_encoding_batch_changes_nothing(data, tmp_path):
    """dev_batch_size (questions) and val_av_rank_bsz (passages) 1 against 4 and 64: the same values."""
    single = trainer(data, tmp_path / "one", train__dev_batch_size=1, train__val_av_rank_bsz=1, **RETRIEVAL)
    one = single.validate(0)
    many = trainer(data, tmp_path / "many", train__dev_batch_size=4, train__val_av_rank_bsz=64, **RETRIEVAL).validate(0)
    assert min_relative_gap_at_relevant(single) > 1e-4  # float noise cannot reorder the passages that count
    assert (one.metric, one.higher_is_better, list(one.scalars)) == (MRR_NAME, True, ["recall@1", "recall@3",
                                                                                     "recall@10"])
    assert one.value == pytest.approx(many.value, abs=1e-9)
    assert one.scalars == pytest.approx(many.scalars, abs=1e-9)
    assert 0 < one.value <= 1 and one.scalars["recall@1"] <= one.scalars["recall@3"] <= one.scalars["recall@10"]


def test_off_validation_is_nll_then_average_rank_as_before(data, tmp_path, monkeypatch):
    """val_retrieval off: no corpus, no retrieval validation; NLL before val_av_rank_start_epoch, average rank
    from it on. On: NLL before the start epoch is the same NLL."""
    on = trainer(data, tmp_path / "on", **{**RETRIEVAL, "val_av_rank_start_epoch": 1})
    before = on.validate(0)
    forbid_calls(monkeypatch, "dpr.training.biencoder_trainer.build_retrieval_corpus",
                 "dpr.training.biencoder_trainer.BiEncoderTrainer.validate_retrieval")
    off = trainer(data, tmp_path / "off", val_av_rank_start_epoch=1, **MODEL)
    assert off.retrieval_corpus is None and off.options.retrieval is None
    nll = off.validate(0)
    assert (nll.metric, before.metric) == ("nll_loss", "nll_loss") and nll.value == pytest.approx(before.value)
    assert off.validate(1).metric == "average_rank"


def test_records_hold_mrr_and_recall_and_off_records_are_as_before(data, tmp_path, monkeypatch):
    logged = []
    monkeypatch.setattr("dpr.foundation.tensorboard.ScalarLog.add",
                        lambda self, tag, value, step: logged.append((tag, step)))
    _, run = run_trainer(compose_config(tiny_overrides(data["model"], data["train"], data["dev"], str(tmp_path / "on"),
                                                       train__eval_per_epoch=2, **RETRIEVAL)))
    records = records_file(tmp_path / "on", "validation")
    assert [r["metric"] for r in records] == [MRR_NAME, MRR_NAME] and list(records[0]) == RECORD_KEYS + ["scalars"]
    assert [r["value"] for r in records] == [v.value for v in run.validations]
    assert [r["scalars"] for r in records] == [v.scalars for v in run.validations]
    assert all(list(r["scalars"]) == ["recall@1", "recall@3", "recall@10"] for r in records)
    best = max(run.validations, key=lambda v: v.value)  # higher is better
    assert run.best_checkpoint == best.checkpoint and records[0]["best"]
    steps = [v.step for v in run.validations]
    assert all((f"dev/{name}", step) in logged for step in steps for name in [MRR_NAME, "recall@1", "recall@10"])

    run_trainer(compose_config(tiny_overrides(data["model"], data["train"], data["dev"], str(tmp_path / "off"),
                                              train__eval_per_epoch=2, val_av_rank_start_epoch=0, **MODEL)))
    records = records_file(tmp_path / "off", "validation")
    assert [r["metric"] for r in records] == ["average_rank"] * 2 and all(list(r) == RECORD_KEYS for r in records)


def test_two_processes_give_the_values_and_best_checkpoint_of_one(data, tmp_path):
    """torchrun with 2 gloo processes of batch 4 (dev_batch_size 2) against 1 process of batch 8 (dev_batch_size
    4), validating by retrieval twice: the same MRR@10 and Recall@k, the same best checkpoint; 5 questions and an
    odd corpus split unevenly between the processes."""
    overrides = tiny_overrides(data["model"], data["train"], data["dev"], str(tmp_path / "one"), train__batch_size=8,
                               train__dev_batch_size=4, train__eval_per_epoch=2, train__warmup_steps=0,
                               train__learning_rate=2e-5, **RETRIEVAL)
    run_trainer(compose_config(overrides))  # the one process, in this one
    two = [o for o in overrides if not o.startswith(("output_dir=", "train.batch_size=", "train.dev_batch_size="))]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(REPO / "train_dense_encoder.py"), *two, "train.batch_size=4", "train.dev_batch_size=2",
                           "train.val_av_rank_bsz=3", f"output_dir={tmp_path / 'two'}"], cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "rank 1 of 2" in proc.stdout + proc.stderr
    # the same training (tests/test_cli.py proves the weights equal; here Adam's first steps on mean pooling's
    # near-zero gradients leave them apart by up to 3e-5, which moves the scores by about 1e-6 of their size)
    steps = [[(r["step"], r["loss"]) for r in records_file(out, "step")] for out in (tmp_path / "one", tmp_path / "two")]
    assert [s for s, _ in steps[1]] == [s for s, _ in steps[0]] == [1, 2]
    assert [loss for _, loss in steps[1]] == pytest.approx([loss for _, loss in steps[0]], rel=1e-5)
    one, two = records_file(tmp_path / "one", "validation"), records_file(tmp_path / "two", "validation")
    assert [(r["step"], r["metric"]) for r in two] == [(r["step"], r["metric"]) for r in one] == [(1, MRR_NAME), (2, MRR_NAME)]
    for a, b in zip(one, two):
        assert b["value"] == pytest.approx(a["value"], rel=1e-5) and b["scalars"] == pytest.approx(a["scalars"], rel=1e-5)
        assert (b["best"], os.path.basename(b["checkpoint"])) == (a["best"], os.path.basename(a["checkpoint"]))


def test_a_bad_switch_is_one_line(data, tmp_path):
    import train_dense_encoder

    cfg = compose_config(tiny_overrides(data["model"], data["train"], data["dev"], str(tmp_path),
                                        train__val_retrieval="maybe"))
    with pytest.raises(SystemExit) as stopped:
        train_dense_encoder.main.__wrapped__(cfg)
    assert str(stopped.value.code) == "error: train.val_retrieval='maybe' must be true or false"
