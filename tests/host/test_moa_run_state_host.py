"""MoA's per-run and per-call state through the real ComfyUI sampler, on the thin SD1.5.

* The attention router's maps belong to one sampling run (made in an OUTER_SAMPLE wrapper): a
  run that continues another's schedule (KSampler Advanced's start_at_step, at a sigma below the
  first run's last) starts without maps, and two clones sampled in turn share nothing.
* A layer call asks the host nothing: sampling a MoA-patched model under a dispatch mode that
  counts would-be GPU syncs adds at most one per model call to the unpatched model's count
  (issue 22), for the learned and the attention router, cfg 2 and cfg 1, batch 2.
"""

from __future__ import annotations

import importlib

import hostenv
import pytest
import torch
from helpers import moa_weights as aw
from helpers import random_models as rm
from helpers.fixtures import model_folders
from helpers.sync_counter import SyncCounter

pytestmark = pytest.mark.slow

PROMPT = "a man dancing in Paris"
STEPS = 4
SPLIT = 2  # the second run continues the first's schedule from this step


@pytest.fixture(scope="module")
def moa_nodes(pack):
    return importlib.import_module(f"{hostenv.PACK_MODULE}.nodes.moa_nodes")


@pytest.fixture(scope="module")
def files(sd15, tmp_path_factory):
    """models/moa with a learned-router file and an attention-router file (prior_steps 0)."""
    from mixture_core.moa import MoAModel, RouterConfig, prior_weights
    from mixture_core.moa_files import save_moa_file

    root = tmp_path_factory.mktemp("moa_run_state") / "moa"
    root.mkdir()
    (root / "learned.safetensors").symlink_to(aw.cached_moa_file(sd15.model, seed=11))
    prior = prior_weights(sd15.model.model.diffusion_model)
    router = RouterConfig(kind="attention", map_layers=tuple(k for k in prior if k.endswith("attn2")))
    moa = aw._seeded(21, lambda: MoAModel.from_prior(prior, router=router))
    gen = torch.Generator().manual_seed(22)
    with torch.no_grad():  # the personalized attentions away from the prior's, so mixing shows
        for layer in moa.layers:
            for lin in (layer.to_q, layer.to_k, layer.to_v, layer.to_out):
                lin.weight.add_(torch.randn(lin.weight.shape, generator=gen) * lin.weight.std() * 0.5)
    save_moa_file(root / "attention.safetensors", moa.half(), "sd15", {"description": "random weights for tests"})
    with model_folders(moa=root):
        yield root


@pytest.fixture(scope="module")
def clip_l14():
    import comfy.clip_vision

    return comfy.clip_vision.load(str(rm.clip_vision_vit_l14()))


def encode(clip, text):
    import nodes

    with torch.inference_mode():
        return nodes.CLIPTextEncode().encode(clip, text)[0]


def inject(moa_nodes, sd15, clip_vision, name, model=None):
    with torch.inference_mode():
        moa = moa_nodes.LoadMoARouter.execute(name).result[0]
        photo = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(1))
        return moa_nodes.MoASubjectInject.execute(
            model=model if model is not None else sd15.model,
            moa=moa,
            clip=sd15.clip,
            clip_vision=clip_vision,
            text=PROMPT,
            subject_words="man",
            image_1=photo,
            subject_weights="1.0",
            strength=1.0,
            start_percent=0.0,
            end_percent=1.0,
        ).result


def sample(model, positive, negative, start=0, last=STEPS, cfg=2.0, batch=1, steps=STEPS):
    """KSampler Advanced's path: steps start..last of a `steps` schedule, noise added only at 0."""
    import nodes

    latent = {"samples": torch.zeros(batch, 4, 8, 8)}
    with torch.inference_mode():
        (out,) = nodes.common_ksampler(
            model, 7, steps, cfg, "euler", "normal", positive, negative, latent,
            disable_noise=start > 0, start_step=start, last_step=last, force_full_denoise=last == steps,
        )  # fmt: skip
    return out["samples"]


def spied(model):
    """A clone with spies before (the prior's output) and after (MoA's) every attention output
    patch: lists of (sigma, output)."""
    model = model.clone()
    prior, mixed = [], []

    def spy(seen):
        def patch(out, extra_options):
            seen.append((float(extra_options["sigmas"].reshape(-1)[0]), out.clone()))
            return out

        return patch

    patches = model.model_options["transformer_options"]["patches"]
    for attn in ("attn1", "attn2"):
        patches[f"{attn}_output_patch"].insert(0, spy(prior))
        patches[f"{attn}_output_patch"].append(spy(mixed))
    return model, prior, mixed


def mixes_per_sigma(prior, mixed) -> dict[float, int]:
    """{sigma: how many layer calls MoA changed}."""
    counts: dict[float, int] = {}
    for (sigma, a), (_, b) in zip(prior, mixed):
        counts[sigma] = counts.get(sigma, 0) + int(not torch.equal(a, b))
    return counts


def test_a_run_continuing_anothers_schedule_starts_without_maps(moa_nodes, sd15, files, clip_l14):
    """Run 1: steps 0..2; run 2 (the same patched model): steps 2..4, its first sigma below run
    1's last. Run 2's first step is the prior in every layer (no maps of its own yet), its
    second mixes; and run 2 gives what it gives on a fresh patch, so nothing of run 1 leaked."""
    patched, positive = inject(moa_nodes, sd15, clip_l14, "attention.safetensors")
    negative = encode(sd15.clip, "")
    first = sample(patched, positive, negative, 0, SPLIT)
    model, prior, mixed = spied(patched)
    second = sample(model, positive, negative, SPLIT, STEPS, steps=STEPS)
    counts = mixes_per_sigma(prior, mixed)
    sigmas = sorted(counts, reverse=True)
    assert len(sigmas) == STEPS - SPLIT and len(prior) == len(mixed) == 32 * len(sigmas)
    assert counts[sigmas[0]] == 0, counts  # the first step of a run: no maps, the prior alone
    assert counts[sigmas[1]] == 32, counts  # then the previous step's maps mix in every layer
    fresh, fresh_positive = inject(moa_nodes, sd15, clip_l14, "attention.safetensors")
    sample(fresh, fresh_positive, negative, 0, SPLIT)
    assert torch.equal(second, sample(fresh, fresh_positive, negative, SPLIT, STEPS))
    assert torch.isfinite(first).all()


def test_two_clones_sampled_in_turn_share_nothing(moa_nodes, sd15, files, clip_l14):
    """Clone B continues a schedule from step 2 alone; then clone A runs steps 0..2 and B its
    part again: B gives what it gave alone (A's maps, of a higher sigma, do not reach it), and
    A's run gives the same twice (no state kept on the patch the clones share)."""
    patched, positive = inject(moa_nodes, sd15, clip_l14, "attention.safetensors")
    negative = encode(sd15.clip, "")
    a, b = patched.clone(), patched.clone()
    alone = sample(b, positive, negative, SPLIT, STEPS)
    head = sample(a, positive, negative, 0, SPLIT)
    assert torch.equal(sample(b, positive, negative, SPLIT, STEPS), alone)
    assert torch.equal(sample(a, positive, negative, 0, SPLIT), head)


def model_calls(model):
    """A clone counting its diffusion model calls (a wrapper, as other packs add)."""
    import comfy.patcher_extension

    model = model.clone()
    calls = []

    def count(executor, *args, **kwargs):
        calls.append(1)
        return executor(*args, **kwargs)

    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test.count", count)
    return model, calls


@pytest.mark.parametrize(("router", "cfg"), [("learned", 2.0), ("learned", 1.0), ("attention", 2.0)])
def test_moa_adds_no_sync_per_layer_call(moa_nodes, sd15, files, clip_l14, router, cfg):
    """KSampler, 3 steps, batch 2: the patched model's would-be syncs minus the unpatched
    model's are at most 1 per model call (the sigma read once per call, for the schedule and
    the attention router's steps), whereas one per layer call would be 32 per call."""
    patched, positive = inject(moa_nodes, sd15, clip_l14, f"{router}.safetensors")
    negative = encode(sd15.clip, "")
    counted = {}
    for name, model in (("plain", sd15.model), ("moa", patched)):
        model, calls = model_calls(model)
        sample(model, positive, negative, cfg=cfg, batch=2, steps=3, last=3)  # warm-up: loading
        calls.clear()
        with SyncCounter() as syncs:
            sample(model, positive, negative, cfg=cfg, batch=2, steps=3, last=3)
        counted[name] = (syncs, len(calls))
    (plain, calls), (moa, moa_calls) = counted["plain"], counted["moa"]
    assert calls == moa_calls == 3 and moa.ops > plain.ops  # MoA did its work under the counter
    added = moa.total - plain.total
    assert added <= calls, f"MoA added {added} syncs in {calls} model calls\n{moa.report()}\n{plain.report()}"
