"""A tiny bi-encoder, its towers and gradient comparisons, shared by the gradient-cache and precision tests."""
import torch

from dpr.data.biencoder_batch import sample_examples
from dpr.data.biencoder_data import load_biencoder_samples
from dpr.data.tensorizer import Tensorizer
from dpr.models.biencoder import build_biencoder, nll_loss
from dpr.models.encoder_spec import EncoderSpec
from dpr.models.hf_encoder import load_tokenizer
from dpr.training.false_negatives import FalseNegativeMask
from dpr.training.grad_cache import GradCache, Tower, full_batch_step
from tests.fixtures import write_retriever_json
from tests.tiny_models import tiny_bert_dir

SEQUENCE_LENGTH = 48


def tiny_setup(folder):
    """(model directory, samples, tensorizer) of a tiny BERT with dropout 0.1 and 12 fixture questions (passage ids
    by topic: copies of a gold passage among other questions' contexts, as in real data)."""
    model_dir = tiny_bert_dir(folder / "bert", dropout=0.1)
    samples = load_biencoder_samples([write_retriever_json(folder / "train.json", 12, topic_ids=True)])
    tensorizer = Tensorizer(load_tokenizer(model_dir), SEQUENCE_LENGTH)
    return model_dir, samples, tensorizer


def make_model(model_dir, fix_ctx=False):
    torch.manual_seed(0)
    spec = EncoderSpec(model_dir, sequence_length=SEQUENCE_LENGTH, dropout=0.1, fix_ctx_encoder=fix_ctx)
    model = build_biencoder(spec)
    model.train()
    return model


def towers(model, batch, q_chunk, ctx_chunk):
    q_grad, ctx_grad = model.trainable_towers()
    return [
        Tower(lambda c: model.encode_questions(c["input_ids"], c["attention_mask"], c["seeds"]),
              {"input_ids": batch.question_ids, "attention_mask": batch.question_mask, "seeds": batch.question_seeds},
              q_chunk, q_grad),
        Tower(lambda c: model.encode_contexts(c["input_ids"], c["attention_mask"], c["seeds"]),
              {"input_ids": batch.context_ids, "attention_mask": batch.context_mask, "seeds": batch.context_seeds},
              ctx_chunk, ctx_grad),
    ]


def gradients(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_gradients(expected, actual, rtol=1e-4):
    """Equal to a relative 1e-4; entries that are zero up to float noise (e.g. attention key biases, whose
    gradient vanishes) are compared against the largest gradient instead."""
    assert expected.keys() == actual.keys() and expected
    largest = max(float(g.abs().max()) for g in expected.values())
    for name, g in expected.items():
        torch.testing.assert_close(actual[name], g, rtol=rtol, atol=1e-6 * largest, msg=name)


def false_negative_mask(mode, samples, indices, hard, other, seed=0, epoch=0):
    """The mask of `mode` for the training batch of `indices` (as make_biencoder_batch samples it)."""
    examples = sample_examples(samples, indices, hard, other, shuffle=True, seed=seed, epoch=epoch)
    return FalseNegativeMask(mode)(examples, [samples[i].answers for i in indices])


def run(model, batch, grad_cache, q_chunk=None, ctx_chunk=None, backward_weight=1.0, masked=None):
    model.zero_grad(set_to_none=True)
    t = towers(model, batch, q_chunk or 10**6, ctx_chunk or 10**6)

    def loss_fn(q, ctx, positive_indices):
        return nll_loss(q, ctx, positive_indices, masked=masked)

    if grad_cache:
        loss, correct = GradCache(loss_fn)(t, backward_weight, positive_indices=batch.positive_indices)
    else:
        loss, correct = full_batch_step(t, loss_fn, backward_weight, positive_indices=batch.positive_indices)
    return float(loss), correct, gradients(model)


