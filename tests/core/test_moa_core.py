"""MoA core: the mixed attention against the equations, subject binding, interpolations,
the file format and its errors (no host needed; small widths)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mixture_core.errors import WeightFileError
from mixture_core.moa import (
    AttentionShape,
    MoALayer,
    MoAModel,
    MultimodalFusion,
    SubjectBinding,
    bind_subjects,
    bind_subjects_where,
    is_moa_target,
    morph_embeddings,
    timelapse_tokens,
)
from mixture_core.moa_files import check_against_model, load_moa_file, save_moa_file
from mixture_core.safetensors_io import load_safetensors

DIM, TEXT, IMAGE, HEADS, DIM_HEAD = 16, 12, 10, 2, 4  # inner 8 != dim, text width != dim
SELF = "input_blocks.1.1.transformer_blocks.0.attn1"
CROSS = "input_blocks.1.1.transformer_blocks.0.attn2"
SHAPES = {SELF: AttentionShape(DIM, DIM, HEADS, DIM_HEAD), CROSS: AttentionShape(DIM, TEXT, HEADS, DIM_HEAD)}
HYPER = dict(router_hidden=8, fusion_hidden=16, spacetime_dim=6, text_dim=TEXT, image_dim=IMAGE)


def randomize(module, seed=0, scale=0.5):
    """Random values everywhere (as after training): the zero/prior-favouring inits would hide the math."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return module


def small_model(seed=0, dtype=torch.float64):
    return randomize(MoAModel(SHAPES, **HYPER).to(dtype), seed)


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def reference_attention(h, context, wq, wk, wv, wo, bo, heads):
    """Per head softmax(Q K^T / sqrt(d)) V, heads concatenated, then the output projection."""
    q, k, v = h @ wq.T, context @ wk.T, context @ wv.T
    d = q.shape[-1] // heads
    per_head = []
    for i in range(heads):
        cols = slice(i * d, (i + 1) * d)
        scores = q[..., cols] @ k[..., cols].transpose(-1, -2) / math.sqrt(d)
        per_head.append(torch.softmax(scores, dim=-1) @ v[..., cols])
    return torch.cat(per_head, dim=-1) @ wo.T + bo


def reference_layer(layer, h, prior_out, context, strength):
    """R = softmax(W2 silu(W1 h + b1) + b2); out = (1 - s R1) prior + s R1 personal."""
    p = {name: t.detach() for name, t in layer.named_parameters()}
    ctx = h if context is None else context
    personal = reference_attention(
        h, ctx, p["to_q.weight"], p["to_k.weight"], p["to_v.weight"], p["to_out.weight"], p["to_out.bias"], layer.heads
    )
    hidden = F.silu(h @ p["router.fc1.weight"].T + p["router.fc1.bias"])
    logits = hidden @ p["router.fc2.weight"].T + p["router.fc2.bias"]
    r = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
    r1 = strength * r[..., 1:]
    return (1 - r1) * prior_out + r1 * personal


# ----------------------------------------------------------------------------- 1. the mixed attention


@pytest.mark.parametrize("layer_id", [SELF, CROSS])
@pytest.mark.parametrize("strength", [1.0, 0.4, 1.5])
def test_layer_matches_reference(layer_id, strength):
    layer = small_model()[layer_id]
    h, prior = rand(2, 7, DIM, seed=1), rand(2, 7, DIM, seed=2)
    context = None if layer_id == SELF else rand(2, 5, TEXT, seed=3)
    out = layer(h, prior, context, strength=strength)
    torch.testing.assert_close(out, reference_layer(layer, h, prior, context, strength), rtol=1e-10, atol=1e-10)
    routes = layer.route(h)
    assert (
        routes.shape == (2, 7, 2)
        and 0.05 < routes[..., 1].std()
        and torch.allclose(routes.sum(-1), torch.ones(2, 7, dtype=h.dtype))
    )


def test_host_attention_plugs_in_and_weights_follow_the_input_dtype():
    layer = small_model()[CROSS]
    h, prior, context = rand(2, 7, DIM, seed=1), rand(2, 7, DIM, seed=2), rand(2, 5, TEXT, seed=3)
    calls = []

    def host_attention(q, k, v, heads):
        calls.append((q.shape, k.shape, heads))
        return (
            F.scaled_dot_product_attention(*(t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v)))
            .transpose(1, 2)
            .flatten(2)
        )

    torch.testing.assert_close(layer(h, prior, context, attention=host_attention), layer(h, prior, context))
    assert calls == [((2, 7, HEADS * DIM_HEAD), (2, 5, HEADS * DIM_HEAD), HEADS)]
    out32 = layer(h.float(), prior.float(), context.float())  # float64 weights, float32 compute
    assert out32.dtype == torch.float32 and layer.to_q.weight.dtype == torch.float64
    torch.testing.assert_close(out32, layer(h, prior, context).float(), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- 2. the prior


def test_strength_zero_returns_the_prior_itself_and_a_prior_router_gives_the_prior():
    layer = small_model()[CROSS]
    h, prior, context = rand(2, 7, DIM, seed=1), rand(2, 7, DIM, seed=2), rand(2, 5, TEXT, seed=3)
    assert layer(h, prior, context, strength=0.0) is prior
    with pytest.raises(ValueError, match="strength"):
        layer(h, prior, context, strength=-0.5)
    with torch.no_grad():
        layer.router.fc2.weight.zero_()
        layer.router.fc2.bias.copy_(torch.tensor([50.0, -50.0]))
    torch.testing.assert_close(layer(h, prior, context), prior, rtol=0, atol=1e-30)


def test_observer_receives_the_prior_weight_of_the_call():
    """MoALayer's observer (as MoLE's) sees R0' = 1 - strength * R1 per token; the output is
    the same with and without one; at strength 0 nothing is computed, nothing observed."""
    layer = small_model()[CROSS]
    h, prior, context = rand(2, 7, DIM, seed=1), rand(2, 7, DIM, seed=2), rand(2, 5, TEXT, seed=3)
    seen = []
    out = layer(h, prior, context, strength=0.6, observer=seen.append)
    assert torch.equal(out, layer(h, prior, context, strength=0.6))
    (weight,) = seen
    assert weight.shape == (2, 7)
    torch.testing.assert_close(weight, 1 - 0.6 * layer.route(h)[..., 1])
    torch.testing.assert_close(out, weight[..., None] * prior + (1 - weight[..., None]) * layer.personal(h, context))
    layer(h, prior, context, strength=0.0, observer=seen.append)
    assert len(seen) == 1


def test_fresh_router_prefers_the_prior():
    layer = MoALayer(SHAPES[SELF], router_hidden=8)
    r = layer.route(torch.randn(2, 7, DIM))
    assert (r[..., 0] > 0.9).all() and (r[..., 1] > 0).all()


# ----------------------------------------------------------------------------- 3. binding subjects


def bound(seed=0):
    fusion = randomize(MultimodalFusion(TEXT, IMAGE, 16, 6, n_layers=2).double(), seed)
    context, t = rand(2, 9, TEXT, seed=4), torch.tensor([999.0, 500.0], dtype=torch.float64)
    return fusion, context, t


def test_bind_subjects_changes_only_the_bound_tokens():
    fusion, context, t = bound()
    before = context.clone()
    man, woman = SubjectBinding(2, rand(IMAGE, seed=5)), SubjectBinding(6, rand(IMAGE, seed=6))
    out = bind_subjects(context, [man, woman], fusion, t, layer_index=1)
    assert torch.equal(context, before)  # input not mutated
    others = [i for i in range(9) if i not in (2, 6)]
    assert torch.equal(out[:, others], context[:, others])
    # Each subject's token is its own fusion, the same as binding it alone.
    for b in (man, woman):
        alone = bind_subjects(
            context, [b], fusion, t, 1
        )  # equal up to rounding: the batched matmul may round differently
        torch.testing.assert_close(out[:, b.token_index], alone[:, b.token_index])
        expected = fusion(context[:, b.token_index], b.image_embedding.expand(2, -1), t, 1)
        torch.testing.assert_close(out[:, b.token_index], expected)
        assert not torch.allclose(out[:, b.token_index], context[:, b.token_index])
    # The fused token depends on the timestep and the layer.
    assert not torch.allclose(bind_subjects(context, [man], fusion, t.flip(0), 1)[:, 2], out[:, 2])
    assert not torch.allclose(bind_subjects(context, [man], fusion, t, 0)[:, 2], out[:, 2])
    with pytest.raises(ValueError, match="own token"):
        bind_subjects(context, [man, SubjectBinding(2, rand(IMAGE, seed=7))], fusion, t, 1)


def test_bind_weights_and_the_unconditional_rows():
    fusion, context, t = bound()
    image = rand(IMAGE, seed=5)
    assert bind_subjects(context, [SubjectBinding(3, image, weight=0.0)], fusion, t, 0) is context
    full = bind_subjects(context, [SubjectBinding(3, image, 1.0)], fusion, t, 0)
    half = bind_subjects(context, [SubjectBinding(3, image, 0.5), SubjectBinding(5, image, 0.0)], fusion, t, 0)
    torch.testing.assert_close(half[:, 3], (context[:, 3] + full[:, 3]) / 2)
    assert torch.equal(half[:, 5], context[:, 5])

    is_cond = torch.tensor([True, False])
    out = bind_subjects_where(context, is_cond, [SubjectBinding(3, image)], fusion, t, 0)
    assert torch.equal(out[1], context[1])  # the unconditional row keeps the null-text context
    torch.testing.assert_close(out[0], full[0])
    assert torch.equal(
        bind_subjects_where(context, torch.tensor([False, False]), [SubjectBinding(3, image)], fusion, t, 0), context
    )


def test_untrained_fusion_is_the_identity():
    fusion = MultimodalFusion(TEXT, IMAGE, 16, 6, n_layers=2)
    context = torch.randn(2, 9, TEXT)
    out = bind_subjects(context, [SubjectBinding(3, torch.randn(IMAGE))], fusion, torch.tensor(10), 0)
    assert torch.equal(out, context) and out is not context


# ----------------------------------------------------------------------------- 4. interpolations


@pytest.mark.parametrize("interpolate", [morph_embeddings, timelapse_tokens])
def test_interpolation_endpoints_are_exact(interpolate):
    a, b = rand(3, 768, seed=1, dtype=torch.float32), rand(3, 768, seed=2, dtype=torch.float32) * 2
    assert torch.equal(interpolate(a, b, 0.0), a) and torch.equal(interpolate(a, b, 1.0), b)
    mid = interpolate(a, b, 0.5)
    assert not torch.allclose(mid, a) and not torch.allclose(mid, b)
    # The norm is interpolated too: a plain lerp of nearly orthogonal vectors would shrink it.
    torch.testing.assert_close(mid.norm(dim=-1), (a.norm(dim=-1) + b.norm(dim=-1)) / 2)
    torch.testing.assert_close(F.normalize(mid, dim=-1), F.normalize(a + b, dim=-1))
    with pytest.raises(ValueError, match="alpha"):
        interpolate(a, b, 1.5)


# ----------------------------------------------------------------------------- 5. files


def test_file_round_trip(tmp_path):
    model = small_model(dtype=torch.float32)
    path = tmp_path / "subject.safetensors"
    save_moa_file(path, model, "sd15", extra_metadata={"moa.format": "spoof", "note": "kept"})
    loaded = load_moa_file(path)
    assert loaded.layer_ids == [SELF, CROSS] and loaded.shapes() == SHAPES and loaded.base_family == "sd15"
    assert loaded.metadata["note"] == "kept" and loaded.metadata["moa.format"] == "moa"
    assert (
        loaded.metadata["moa.image_encoder"] == "clip-vit-l-14"
        and json.loads(loaded.metadata["moa.heads"])[CROSS] == HEADS
    )
    h, prior, context = (
        rand(2, 7, DIM, seed=1, dtype=torch.float32),
        rand(2, 7, DIM, seed=2, dtype=torch.float32),
        rand(2, 5, TEXT, seed=3, dtype=torch.float32),
    )
    for layer_id, ctx in ((SELF, None), (CROSS, context)):
        assert torch.equal(loaded[layer_id](h, prior, ctx), model[layer_id](h, prior, ctx))
    binding = [SubjectBinding(1, rand(IMAGE, seed=5, dtype=torch.float32))]
    t = torch.tensor([100.0, 900.0])
    assert torch.equal(
        bind_subjects(context, binding, loaded.fusion, t, 1), bind_subjects(context, binding, model.fusion, t, 1)
    )
    assert set(load_safetensors(path)[0]) >= {
        f"{CROSS}.router.fc1.weight",
        "fusion.mlp.fc2.bias",
        "spacetime.layer_embedding.weight",
    }
    check_against_model(loaded, {SELF: (DIM, DIM), CROSS: (DIM, TEXT), "other.attn1": (8, 8)}, "sd15", path)


def test_from_prior_starts_as_the_prior(tmp_path):
    g = torch.Generator().manual_seed(0)
    w = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64) * 0.3  # noqa: E731
    prior = {
        lid: {
            "to_q": w(8, DIM),
            "to_k": w(8, s.context_dim),
            "to_v": w(8, s.context_dim),
            "to_out": (w(DIM, 8), w(DIM)),
            "heads": HEADS,
        }
        for lid, s in SHAPES.items()
    }
    model = MoAModel.from_prior(prior, **HYPER)
    assert model.shapes() == SHAPES and model[SELF].to_q.weight.dtype == torch.float64
    h, context = rand(2, 7, DIM, seed=1), rand(2, 5, TEXT, seed=3)
    for lid, ctx in ((SELF, None), (CROSS, context)):
        p = prior[lid]
        prior_out = reference_attention(
            h, h if ctx is None else ctx, p["to_q"], p["to_k"], p["to_v"], *p["to_out"], HEADS
        )
        randomize(model[lid].router, seed=9)  # any router: both experts are the same attention
        torch.testing.assert_close(model[lid](h, prior_out, ctx), prior_out, rtol=1e-12, atol=1e-12)
    bad = {SELF: {**prior[SELF], "to_v": w(8, 3)}}
    with pytest.raises(ValueError, match="to_v"):
        MoAModel.from_prior(bad, **HYPER)


def rewrite(src, dst, edit_tensors=None, edit_metadata=None):
    tensors, metadata = load_safetensors(src)
    (edit_tensors or (lambda t: None))(tensors)
    (edit_metadata or (lambda m: None))(metadata)
    save_file(tensors, str(dst), metadata)
    return dst


def set_item(key, value):
    return lambda d: d.__setitem__(key, value)


BAD_FILES = {
    "no_tag": (None, lambda m: m.pop("moa.format"), "no moa.format"),
    "wrong_tag": (None, set_item("moa.format", "mole-gates"), "has moa.format 'mole-gates'"),
    "version": (None, set_item("moa.format_version", "3"), "version '3' is not supported"),
    "bad_heads": (None, set_item("moa.heads", "not json"), "metadata is incomplete or malformed"),
    "encoder": (None, set_item("moa.image_encoder", "dinov2"), "dinov2"),
    "missing": (
        lambda t: [t.pop(k) for k in [f"{CROSS}.to_v.weight", "fusion.mlp.fc1.bias"]],
        None,
        f"2 tensor\\(s\\) are missing\n  {CROSS}.to_v.weight",
    ),
    "missing_q": (
        lambda t: t.pop(f"{SELF}.to_q.weight"),
        None,
        f"attention tensor\\(s\\) are missing\n  {SELF}.to_q.weight",
    ),
    "shape": (
        set_item(f"{CROSS}.router.fc2.weight", torch.zeros(3, 8)),
        None,
        f"wrong shape or dtype\n  {CROSS}.router.fc2.weight: \\(3, 8\\) float32, expected \\(2, 8\\)",
    ),
    "dtype": (
        set_item("spacetime.layer_embedding.weight", torch.zeros(2, 6, dtype=torch.int64)),
        None,
        "spacetime.layer_embedding.weight: \\(2, 6\\) int64",
    ),
    "odd_spacetime": (None, set_item("moa.spacetime_dim", "5"), "cannot be built \\(the spacetime width must be even"),
    "heads": (
        None,
        set_item("moa.heads", json.dumps({SELF: 3, CROSS: 2})),
        f"{SELF}: an inner width of 8 does not split into 3 heads",
    ),
    "extra": (set_item("stray.weight", torch.zeros(2)), None, "does not describe\n  stray.weight"),
    "nan": (set_item("fusion.mlp.fc2.bias", torch.full((TEXT,), float("nan"))), None, "NaN or inf"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_files_name_the_file_and_the_problem(tmp_path, case):
    good = tmp_path / "good.safetensors"
    save_moa_file(good, small_model(dtype=torch.float32), "sd15")
    edit_tensors, edit_metadata, problem = BAD_FILES[case]
    path = rewrite(good, tmp_path / f"bad_{case}.safetensors", edit_tensors, edit_metadata)
    with pytest.raises(WeightFileError, match=f"^bad_{case}.safetensors: ") as err:
        load_moa_file(path)
    assert err.match(problem)


def test_model_mismatches_name_the_file(tmp_path):
    path = tmp_path / "subject.safetensors"
    save_moa_file(path, small_model(dtype=torch.float32), "sd15")
    model = load_moa_file(path)
    with pytest.raises(WeightFileError, match="subject.safetensors: was made for 'sd15' models, this model is 'sdxl'"):
        check_against_model(model, {SELF: (DIM, DIM), CROSS: (DIM, TEXT)}, "sdxl", path)
    with pytest.raises(
        WeightFileError,
        match=f"subject.safetensors: does not fit .*\n  {CROSS}: file has dim 16, context 12; model has dim 16, context 2048",
    ):
        check_against_model(model, {SELF: (DIM, DIM), CROSS: (DIM, 2048)}, "sd15", path)
    with pytest.raises(WeightFileError, match=f"{CROSS}: no such attention layer"):
        check_against_model(model, {SELF: (DIM, DIM)}, "sd15", path)


# ----------------------------------------------------------------------------- 6. training and purity


def test_gradients_reach_router_personal_projections_and_fusion():
    model = MoAModel(SHAPES, **HYPER)
    fusion_out = model.fusion.mlp.fc2
    with torch.no_grad():  # as after a first training step: the zero-initialised fusion output is not zero any more
        fusion_out.weight.normal_(0, 0.1)
        fusion_out.bias.normal_(0, 0.1)
    h, prior = torch.randn(2, 7, DIM), torch.randn(2, 7, DIM)
    context = bind_subjects_where(
        torch.randn(2, 5, TEXT),
        torch.tensor([True, False]),
        [SubjectBinding(1, torch.randn(IMAGE))],
        model.fusion,
        torch.tensor([10.0, 10.0]),
        model.layer_index(CROSS),
    )
    loss = (model[SELF](h, prior) ** 2).sum() + (model[CROSS](h, prior, context) ** 2).sum()
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert no_grad == [], no_grad


def test_targets_are_the_attention_modules():
    assert is_moa_target(SELF) and is_moa_target("middle_block.1.transformer_blocks.0.attn2")
    assert not is_moa_target(SELF + ".to_q") and not is_moa_target("input_blocks.1.1.proj_in")
