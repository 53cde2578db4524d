"""The reader model (§6): heads and their initialisation, state dict keys, per-row token types, and the loss on
a hand-checked case and against DPR's formula."""
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig

from dpr.models.hf_encoder import encoder_from_config
from dpr.models.reader import Reader, reader_loss, token_type_ids
from dpr.foundation.checkpoints import load_model_state

SEP = 3


def tiny_reader(seed: int = 0, sep_token_id=None) -> Reader:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    return Reader(encoder_from_config(config), 32, sep_token_id)


def test_heads_state_dict_and_shapes():
    reader = tiny_reader()
    keys = reader.state_dict().keys()
    assert {"qa_outputs.weight", "qa_outputs.bias", "qa_classifier.weight", "qa_classifier.bias"} <= set(keys)
    assert any(k.startswith("encoder.embeddings.") for k in keys) and "encoder.pooler.dense.weight" in keys
    assert reader.qa_outputs.weight.shape == (2, 32) and reader.qa_classifier.weight.shape == (1, 32)
    for head in (reader.qa_outputs, reader.qa_classifier):
        assert torch.all(head.bias == 0)
        assert 0.01 < head.weight.std().item() < 0.03
    ids = torch.randint(5, 50, (2, 3, 7))
    ids[1, 2] = 0  # an all-padding passage slot
    start, end, relevance = reader(ids, (ids != 0).long())
    assert start.shape == end.shape == (2, 3, 7) and relevance.shape == (2, 3)
    assert torch.isfinite(start).all() and torch.isfinite(relevance).all()


def test_reader_state_round_trips_through_load_model_state():
    a, b = tiny_reader(0).eval(), tiny_reader(1).eval()
    load_model_state(b, a.state_dict())
    ids = torch.randint(5, 50, (1, 2, 6))
    for x, y in zip(a(ids, torch.ones_like(ids)), b(ids, torch.ones_like(ids))):
        assert torch.equal(x, y)


def test_token_types_are_computed_per_row():
    ids = torch.tensor([
        [2, 7, SEP, 8, SEP, 9, 0],  # [CLS] q [SEP] title [SEP] passage [PAD]
        [2, 7, 7, SEP, 8, SEP, 9],  # a longer question: the first [SEP] comes later
        [2, 7, SEP, 8, SEP, 9, SEP],  # three [SEP]s (DPR's global count assumes two per row)
        [0, 0, 0, 0, 0, 0, 0],  # an all-padding row
    ])
    assert token_type_ids(ids, SEP).tolist() == [
        [0, 0, 0, 1, 1, 1, 1],
        [0, 0, 0, 0, 1, 1, 1],
        [0, 0, 0, 1, 1, 1, 1],
        [0, 0, 0, 0, 0, 0, 0],
    ]
    with_types, without = tiny_reader(0, sep_token_id=SEP).eval(), tiny_reader(0).eval()
    with torch.no_grad():
        with_types.encoder.embeddings.token_type_embeddings.weight[1] += 1.0
    row = ids[:1].unsqueeze(0)
    assert not torch.allclose(with_types(row, (row != 0).long())[0], without(row, (row != 0).long())[0])


def test_loss_on_a_hand_checked_case():
    ln = math.log
    # question 0: passage 0 is the positive; start probs [1/4, 1/2, 1/4], end probs [1/4, 1/4, 1/2]
    start = torch.tensor([[[0.0, ln(2), 0.0], [5.0, -1.0, 2.0]], [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])
    end = torch.tensor([[[0.0, 0.0, ln(2)], [1.0, 7.0, 0.0]], [[3.0, 2.0, 1.0], [0.0, 0.0, 0.0]]])
    relevance = torch.tensor([[ln(3), 0.0], [0.0, 0.0]])
    # answers (1, 2): p = 1/2 * 1/2; (0, 0): p = 1/4 * 1/4; a third slot is masked out; question 1 has none
    start_positions = torch.tensor([[[1, 0, 2], [0, 0, 0]], [[0, 0, 0], [0, 0, 0]]])
    end_positions = torch.tensor([[[2, 0, 1], [0, 0, 0]], [[0, 0, 0], [0, 0, 0]]])
    mask = torch.tensor([[[1, 1, 0], [0, 0, 0]], [[0, 0, 0], [0, 0, 0]]])
    loss = reader_loss(start_positions, end_positions, mask, start, end, relevance)
    span = -ln(1 / 4 + 1 / 16)  # marginal likelihood of the two answers
    switch = -ln(3 / 4) - ln(1 / 2)  # positive relevance 3:1 in question 0, 1:1 in question 1
    assert loss.item() == pytest.approx(span + switch, rel=1e-6)
    assert loss.item() == pytest.approx(ln(128 / 15), rel=1e-6)


def dpr_formula(start_positions, end_positions, mask, start, end, relevance):
    """§6 written out: CE with ignore_index=T, masked, stacked, max over M, then the 1e10 trick."""
    n, m, t = start.shape
    switch = F.cross_entropy(relevance, torch.zeros(n, dtype=torch.long), reduction="sum")
    s, e = start.view(n * m, t), end.view(n * m, t)
    losses = []
    for a in range(start_positions.shape[-1]):
        sp, ep = start_positions[..., a].reshape(-1).clamp(0, t), end_positions[..., a].reshape(-1).clamp(0, t)
        ce = F.cross_entropy(s, sp, ignore_index=t, reduction="none") + F.cross_entropy(e, ep, ignore_index=t,
                                                                                       reduction="none")
        losses.append(ce * mask[..., a].reshape(-1))
    loss = torch.stack(losses, dim=1).view(n, m, -1).max(dim=1).values
    total = torch.exp(-loss - 1e10 * (loss == 0).float()).sum(dim=1)
    return -torch.log(total + (total == 0).float()).sum() + switch


def test_loss_matches_dprs_formula_and_sends_gradients():
    torch.manual_seed(0)
    n, m, t, a = 3, 4, 9, 5
    start = torch.randn(n, m, t, requires_grad=True)
    end, relevance = torch.randn(n, m, t), torch.randn(n, m)
    positions = torch.randint(0, t, (2, n, m, a))
    mask = torch.zeros(n, m, a, dtype=torch.long)
    mask[0, 0, :3] = 1
    mask[1, 0, :1] = 1  # question 2 has no answer: only its switch loss counts
    start_positions, end_positions = positions[0] * (mask > 0), positions[1] * (mask > 0)
    ours = reader_loss(start_positions, end_positions, mask, start, end, relevance)
    assert ours.item() == pytest.approx(dpr_formula(start_positions, end_positions, mask, start, end, relevance).item(),
                                        rel=1e-5)
    ours.backward()
    assert start.grad[2].abs().sum() == 0 and start.grad[:, 1:].abs().sum() == 0  # only positive rows with answers
    # DPR's sum of exponentials underflows to a zero loss when every answer is very unlikely; logsumexp does not
    far = torch.full((1, 1, t), -200.0)
    far[0, 0, 0] = 200.0
    hard = reader_loss(torch.tensor([[[5]]]), torch.tensor([[[5]]]), torch.ones(1, 1, 1, dtype=torch.long),
                       far, far, torch.zeros(1, 1))
    assert hard.item() == pytest.approx(800.0, rel=1e-4)
