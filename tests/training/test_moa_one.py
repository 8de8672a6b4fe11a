"""One MoA: the training patch (training.moa_forward) and the inference patch (nodes/moa_patch, as
MoA Subject Inject applies it inside a real KSampler step) on the same UNet, inputs and subjects
give the same UNet output, the same routes (each layer's prior weight per pixel) and the same
subject attention (the personalized cross-attention maps of the subject tokens that the
localization loss reads). A training that mixed differently (a softmax over the wrong dimension,
a subject bound to another token or also in the unconditional row) is caught."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import pytest
import torch
from helpers import moa_weights as aw
from helpers import random_models as rm
from helpers.fixtures import model_folders

from training.moa_forward import Bindings, Record, TrainingPatch

PROMPT = "a photo of a man and a woman in a park"
WIDTH, HEIGHT = 96, 64  # not square: latent 12 x 8


@dataclass
class Run:
    out: torch.Tensor  # the UNet's output (B, 4, h, w)
    routes: list  # per layer call, in call order: (layer id, prior weight (B, T))
    attention: dict  # attn2 layer id -> (B, T, n) subject-token attention of the personalized branch


@pytest.fixture(scope="module")
def inference(sd15, pack, tmp_path_factory):
    """MoA Subject Inject (two subjects) on the thin SD1.5, one euler step at cfg 2 (cond and uncond
    rows in one UNet call): the UNet call's inputs and output, every layer's prior weight (the
    public observe_moa) and what the personalized branch of every cross-attention read."""
    import comfy.clip_vision
    import comfy.patcher_extension

    import nodes

    moa_nodes, moa_patch = (importlib.import_module(f"{pack.__name__}.nodes.{m}") for m in ("moa_nodes", "moa_patch"))
    folder = tmp_path_factory.mktemp("moa_one") / "moa"
    folder.mkdir()
    (folder / "moa.safetensors").symlink_to(aw.cached_moa_file(sd15.model, seed=21))
    clip_vision = comfy.clip_vision.load(str(rm.clip_vision_vit_l14()))
    images = [torch.rand(1, 64, 48, 3, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    with model_folders(moa=folder), torch.inference_mode():
        moa = moa_nodes.LoadMoARouter.execute("moa.safetensors").result[0]
        model, positive = moa_nodes.MoASubjectInject.execute(
            model=sd15.model,
            moa=moa,
            clip=sd15.clip,
            clip_vision=clip_vision,
            text=PROMPT,
            subject_words="man, woman",
            image_1=images[0],
            image_2=images[1],
            subject_weights="1.0, 1.0",
            strength=1.0,
            start_percent=0.0,
            end_percent=1.0,
        ).result
        patch = moa_patch.find_moa_patch(model)
        routes, personal, calls = [], {}, []
        model = moa_patch.observe_moa(model, patch, lambda i, layer_id, w: routes.append((layer_id, w.clone())))
        model = model.clone()

        def capture(executor, x, timesteps, context, y, control, transformer_options, **kw):
            out = executor(x, timesteps, context, y, control, transformer_options, **kw)
            calls.append((x.clone(), timesteps.clone(), context.clone(), list(transformer_options["cond_or_uncond"])))
            calls[-1] += (out.clone(),)
            return out

        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "moa_one", capture)
        layer_class, ids = (
            type(moa.model.layers[0]),
            {id(layer): i for i, layer in zip(moa.model.layer_ids, moa.model.layers)},
        )
        real_personal = layer_class.personal

        def recording(layer, h, context=None, attention=None):
            if context is not None:
                personal[ids[id(layer)]] = (h.clone(), context.clone())
            return real_personal(layer, h, context, attention)

        negative = nodes.CLIPTextEncode().encode(sd15.clip, "")[0]
        latent = {"samples": torch.zeros(1, 4, HEIGHT // 8, WIDTH // 8)}
        layer_class.personal = recording
        try:
            nodes.common_ksampler(model, 7, 1, 2.0, "euler", "normal", positive, negative, latent)
        finally:
            layer_class.personal = real_personal
    ((x, t, context, cond_or_uncond, out),) = calls
    positions = [b.token_index for b in patch.settings.bindings]
    with torch.no_grad():
        attention = {
            layer_id: moa.model[layer_id].subject_attention(h.clone(), c.clone(), positions)
            for layer_id, (h, c) in personal.items()
        }
    return {
        "run": Run(out, routes, attention),
        "inputs": (x, t, context),
        "cond_rows": torch.tensor([chunk == 0 for chunk in cond_or_uncond]).repeat_interleave(
            len(x) // len(cond_or_uncond)
        ),
        "bindings": patch.settings.bindings,
        "moa": moa.model,
        "locations": moa_patch.block_locations(moa_patch.attention_modules(sd15.model)),
    }


def train(sd15, inference, token_index=None, valid=None) -> Run:
    """The training patch on the same UNet call: each conditional row binds the two subjects (the
    padded batch form), an unconditional row none; token_index / valid override that."""
    moa, (x, t, context) = inference["moa"], inference["inputs"]
    rows, n = len(x), len(inference["bindings"])
    if token_index is None:
        token_index = torch.tensor([b.token_index for b in inference["bindings"]]).expand(rows, n)
    if valid is None:
        valid = inference["cond_rows"][:, None].expand(rows, n)
    embeds = torch.stack([b.image_embedding for b in inference["bindings"]]).float().expand(rows, n, -1)
    attn2 = [i for i in moa.layer_ids if i.endswith("attn2")]
    patch = TrainingPatch(moa, inference["locations"], moa.layer_ids, attn2)
    record = Record()
    bindings = Bindings.padded(token_index, valid, embeds, t.float())
    options = {"patches": patch.patches(), TrainingPatch.KEY: (bindings, record)}
    with torch.no_grad():
        out = sd15.model.model.diffusion_model(
            x.clone(), timesteps=t.clone(), context=context.clone(), transformer_options=options
        )
    order = [layer_id for layer_id, _ in inference["run"].routes]  # the UNet's call order
    assert len(record.router) == len(order) and len(record.attention) == len(attn2)
    attention = dict(zip([i for i in order if i.endswith("attn2")], record.attention))
    return Run(out, list(zip(order, record.router)), attention)


def differences(trained: Run, inferred: Run, cond_rows: torch.Tensor) -> dict[str, float]:
    """Largest absolute difference of the outputs, of the routes (every layer), and of the subject
    attention in the rows that bind subjects."""
    assert [i for i, _ in trained.routes] == [i for i, _ in inferred.routes]
    assert set(trained.attention) == set(inferred.attention) and len(trained.attention) > 0
    return {
        "out": float((trained.out - inferred.out).abs().max()),
        "routes": max(float((a - b).abs().max()) for (_, a), (_, b) in zip(trained.routes, inferred.routes)),
        "attention": max(
            float((trained.attention[k][cond_rows] - inferred.attention[k][cond_rows]).abs().max())
            for k in inferred.attention
        ),
    }


# Measured here (float32, CPU): out 2e-6, routes 8e-7, attention 2e-8 apart; the wrong mixings
# below differ by 1e-2 (a subject one token off) to 0.9 (the router's softmax over the tokens).
TOLERANCE = {"out": 1e-4, "routes": 1e-5, "attention": 1e-5}


def test_training_and_inference_mix_the_same(sd15, inference):
    inferred, cond_rows = inference["run"], inference["cond_rows"]
    assert cond_rows.any() and not cond_rows.all()  # cfg 2: conditional and unconditional rows in one call
    assert len(inferred.routes) == len(inference["moa"].layer_ids) == 32
    routes = torch.cat([w.flatten() for _, w in inferred.routes])
    assert routes.min() < 0.9 and routes.std() > 0.01  # the random routers mix, per pixel
    diff = differences(train(sd15, inference), inferred, cond_rows)
    assert all(diff[k] <= TOLERANCE[k] for k in diff), diff


def _attention_over_pixels(layer, h, context, token_index):
    """MoALayer.subject_attention with its softmax over the queries (pixels) instead of the keys."""
    from mixture_core.moa import linear

    q, k = linear(h.float(), layer.to_q), linear(context.float(), layer.to_k)
    q, k = (t.unflatten(-1, (layer.heads, -1)).transpose(1, 2) for t in (q, k))
    probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-2).mean(1)
    return probs.gather(2, token_index[:, None, :].expand(-1, probs.shape[1], -1))


def test_a_training_that_mixes_otherwise_is_caught(sd15, inference, monkeypatch):
    """The comparison above fails for a router softmax over the tokens instead of the two experts,
    a subject-attention softmax over the pixels instead of the tokens, subjects bound one token
    off, and subjects bound in the unconditional row too."""
    inferred, cond_rows = inference["run"], inference["cond_rows"]
    layer_class = type(inference["moa"].layers[0])
    with monkeypatch.context() as m:
        m.setattr(layer_class, "route", lambda layer, h: torch.softmax(layer.router(h), dim=1))
        swapped = differences(train(sd15, inference), inferred, cond_rows)
    assert swapped["routes"] > 10 * TOLERANCE["routes"] and swapped["out"] > 10 * TOLERANCE["out"], swapped

    with monkeypatch.context() as m:
        m.setattr(layer_class, "subject_attention", _attention_over_pixels)
        maps = differences(train(sd15, inference), inferred, cond_rows)
    assert maps["attention"] > 10 * TOLERANCE["attention"], maps
    assert maps["out"] <= TOLERANCE["out"] and maps["routes"] <= TOLERANCE["routes"], maps  # only the maps differ

    token_index = torch.tensor([b.token_index + 1 for b in inference["bindings"]]).expand(len(cond_rows), -1)
    shifted = differences(train(sd15, inference, token_index=token_index), inferred, cond_rows)
    assert shifted["out"] > 10 * TOLERANCE["out"] and shifted["attention"] > 10 * TOLERANCE["attention"], shifted

    everywhere = torch.ones(len(cond_rows), len(inference["bindings"]), dtype=torch.bool)
    unconditional_too = differences(train(sd15, inference, valid=everywhere), inferred, cond_rows)
    assert unconditional_too["out"] > 10 * TOLERANCE["out"], unconditional_too
