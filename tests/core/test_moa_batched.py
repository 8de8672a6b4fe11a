"""The core's batched, padded MoA API that training and inference share: SubjectIndex made once per
model call, bind_indexed, MoALayer.subject_attention with per-row token indices, and no operation
in a layer call that would stall a GPU (no host read, no data-dependent shape)."""

import pytest
import torch
from helpers.sync_counter import SyncCounter
from test_moa_core import CROSS, IMAGE, TEXT, rand, small_model

from mixture_core.moa import (
    SubjectBinding,
    SubjectIndex,
    bind_indexed,
    bind_subjects,
    bind_subjects_where,
)

B, S, T = 3, 9, 7


def padded_batch():
    """Row 0: two subjects (tokens 2, 6); row 1: none; row 2: one (token 4) and a pad slot."""
    token_index = torch.tensor([[2, 6], [0, 0], [4, 0]])
    valid = torch.tensor([[True, True], [False, False], [True, False]])
    embeds = rand(B, 2, IMAGE, seed=3)
    return token_index, valid, embeds


def test_padded_binding_is_each_sample_bound_alone():
    model = small_model()
    context, t = rand(B, S, TEXT, seed=1), torch.tensor([100.0, 500.0, 900.0], dtype=torch.float64)
    token_index, valid, embeds = padded_batch()
    index = SubjectIndex.from_padded(token_index, valid, embeds)
    assert index.rows.tolist() == [0, 0, 2] and index.tokens.tolist() == [2, 6, 4] and index.max_token == 6
    out = model.bind(context, index, t, model.layer_index(CROSS))
    for b in range(B):
        subjects = [SubjectBinding(int(token_index[b, j]), embeds[b, j]) for j in range(2) if valid[b, j]]
        alone = bind_subjects(context[b : b + 1], subjects, model.fusion, t[b : b + 1], model.layer_index(CROSS))
        torch.testing.assert_close(out[b : b + 1], alone)
    assert torch.equal(out[1], context[1])  # a sample without subjects: bit-identical
    untouched = [i for i in range(S) if i not in (2, 6)]
    assert torch.equal(out[0, untouched], context[0, untouched])
    assert not torch.allclose(out[0, 2], context[0, 2])


def test_gradients_reach_the_image_embeddings_through_the_padded_index():
    model = small_model()
    token_index, valid, embeds = padded_batch()
    embeds = embeds.clone().requires_grad_()
    index = SubjectIndex.from_padded(token_index, valid, embeds)
    out = bind_indexed(rand(B, S, TEXT, seed=1), index, model.fusion, 10.0, 0)
    out.sum().backward()
    assert embeds.grad[0].abs().sum() > 0 and embeds.grad[2, 0].abs().sum() > 0
    assert torch.equal(embeds.grad[1], torch.zeros_like(embeds.grad[1]))  # no subjects: no gradient
    assert torch.equal(embeds.grad[2, 1], torch.zeros_like(embeds.grad[2, 1]))  # the pad slot


def test_rows_index_matches_the_mask_form_and_checks_its_input():
    model = small_model()
    context, t = rand(4, S, TEXT, seed=1), torch.tensor([1.0, 1.0, 2.0, 2.0], dtype=torch.float64)
    bindings = [SubjectBinding(3, rand(IMAGE, seed=5)), SubjectBinding(5, rand(IMAGE, seed=6), weight=0.5)]
    index = SubjectIndex.for_rows(bindings, [1, 3], 4, context.device, IMAGE)
    out = bind_indexed(context, index, model.fusion, t, 1)
    expected = bind_subjects_where(context, torch.tensor([False, True, False, True]), bindings, model.fusion, t, 1)
    assert torch.equal(out, expected)
    assert torch.equal(out[0], context[0]) and torch.equal(out[2], context[2])
    with pytest.raises(ValueError, match="batch of 4 used on a batch of 2"):
        bind_indexed(context[:2], index, model.fusion, t[:2], 1)
    with pytest.raises(ValueError, match="outside the 4-token context"):
        bind_indexed(context[:, :4], index, model.fusion, t, 1)
    with pytest.raises(ValueError, match="outside a batch"):
        SubjectIndex.for_rows(bindings, [4], 4, context.device, IMAGE)
    with pytest.raises(ValueError, match="expected \\(10,\\)"):
        SubjectIndex.for_rows([SubjectBinding(3, torch.zeros(11))], [0], 4, context.device, IMAGE)
    assert SubjectIndex.for_rows(bindings, [], 4, context.device, IMAGE).empty
    assert bind_indexed(context, SubjectIndex.for_rows(bindings, [], 4, "cpu", IMAGE), model.fusion, t, 1) is context


def test_subject_attention_per_row_indices_gather_each_rows_tokens():
    layer = small_model()[CROSS]
    h, context = rand(B, T, 16, seed=2), rand(B, S, TEXT, seed=1)
    token_index, _, _ = padded_batch()
    per_row = layer.subject_attention(h, context, token_index)
    assert per_row.shape == (B, T, 2)
    for b in range(B):
        shared = layer.subject_attention(h[b : b + 1], context[b : b + 1], token_index[b].tolist())
        torch.testing.assert_close(per_row[b : b + 1], shared)
    all_tokens = layer.subject_attention(h, context, list(range(S)))
    torch.testing.assert_close(all_tokens.sum(-1), torch.ones(B, T, dtype=all_tokens.dtype))  # probabilities


def test_subject_attention_is_float32_under_autocast():
    layer = small_model(dtype=torch.float32)[CROSS]
    h, context = rand(2, T, 16, seed=2, dtype=torch.bfloat16), rand(2, S, TEXT, seed=1, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probs = layer.subject_attention(h, context, [2, 6])
        mixed = layer(h, rand(2, T, 16, seed=4, dtype=torch.bfloat16), context)
    assert probs.dtype == torch.float32
    assert mixed.dtype == torch.bfloat16  # the mix in the prior output's dtype, also under autocast
    torch.testing.assert_close(probs, layer.subject_attention(h.float(), context.float(), [2, 6]))


def test_a_layer_call_with_prepared_indices_asks_the_host_nothing():
    """What a layer call does with what the model call prepared: bind, route and mix, record the
    subject attention. On a GPU none of it may wait for the device (issue 22)."""
    model = small_model()
    layer, layer_index = model[CROSS], model.layer_index(CROSS)
    h, prior, context = rand(B, T, 16, seed=2), rand(B, T, 16, seed=4), rand(B, S, TEXT, seed=1)
    token_index, valid, embeds = padded_batch()
    index = SubjectIndex.from_padded(token_index, valid, embeds)  # once per model call
    rows, positions, t = torch.tensor([0, 2]), torch.tensor([2, 6]), torch.tensor([5.0, 5.0, 5.0])
    seen = []
    with SyncCounter() as syncs:
        bound = model.bind(context, index, t, layer_index)
        out = layer(h, prior, bound, strength=0.8, observer=seen.append)
        maps = layer.subject_attention(h.index_select(0, rows), bound.index_select(0, rows), positions)
        per_row = layer.subject_attention(h, bound, token_index)
    assert syncs.ops > 20, "the counter saw the work"
    assert syncs.total == 0, syncs.report()
    assert out.shape == prior.shape and maps.shape == (2, T, 2) and per_row.shape == (B, T, 2) and len(seen) == 1
    # The same counter sees the mask form's sync: the test can fail.
    with SyncCounter() as syncs:
        bind_subjects_where(context, valid[:, 0], [SubjectBinding(2, embeds[0, 0])], model.fusion, t, layer_index)
        context[valid[:, 0]]
    assert syncs.total >= 1
