"""No host-device sync per layer call: sampling a patched model (KSampler's own path,
nodes.common_ksampler, under inference_mode as ComfyUI's executor runs it) dispatches no more of
the operations that would stall a GPU (tests/helpers/sync_counter.py) than sampling the unpatched
model, beyond a small constant per model call.

The budget: PER_MODEL_CALL syncs per UNet call (what a wrapper that sees the cond list once per call
may spend, e.g. reading which rows are conditional); a per-layer sync costs at least one per
patched layer and call (192 MoLE layers, 32 MoA attention layers on SD1.5), far above it.
The thin SD1.5 at 64x64 px, one step: the counts, not the pictures, are under test.

Measured here (two steps, so two UNet calls, at first): MoLE adds 0 in every mode; MoA before its sync-free
rewrite (h4-moa-core) added 98 (96 boolean-mask gathers and writes in mixture_core/moa.py's subject
binding, three per cross-attention layer and call, plus one sigma read per call in its calc_cond_batch
wrapper), after it 2 (one per call).
"""

from __future__ import annotations

import importlib

import hostenv
import pytest
import torch
from helpers import moa_weights as aw
from helpers import mole_weights as mw
from helpers.fixtures import encode_text, model_folders
from helpers.sync_counter import SyncCounter

pytestmark = pytest.mark.slow

PER_MODEL_CALL = 2
STEPS = 1  # a per-layer sync shows 16 to 192 times per call: one call is enough
PROMPT = "a man and a woman dancing in Paris"


def sample_counting(model, positive, negative, cfg: float, batch: int):
    """(syncs, UNet calls) of a STEPS-step euler KSampler run of `model`."""
    import comfy.patcher_extension

    import nodes

    calls = []

    def count_calls(executor, *args, **kwargs):
        calls.append(1)
        return executor(*args, **kwargs)

    counted = model.clone()
    counted.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "sync count test", count_calls)
    latent = {"samples": torch.zeros(batch, 4, 8, 8)}
    with torch.inference_mode(), SyncCounter() as syncs:
        nodes.common_ksampler(counted, 5, STEPS, cfg, "euler", "normal", positive, negative, latent)
    assert syncs.ops > 500 and calls  # the mode saw the sampling
    return syncs, len(calls)


_BASELINES = {}


def assert_no_sync_per_layer(sd15, patched, positive, negative, cfg, batch):
    """The unpatched model's run (the sampler's own syncs) is sampled with the plain prompt."""
    key = (cfg, batch)
    if key not in _BASELINES:
        plain = encode_text(sd15.clip, PROMPT)
        _BASELINES[key] = sample_counting(sd15.model, plain, encode_text(sd15.clip, ""), cfg, batch)
    plain, plain_calls = _BASELINES[key]
    syncs, calls = sample_counting(patched, positive, negative, cfg, batch)
    assert calls == plain_calls
    added = syncs.total - plain.total
    assert added <= PER_MODEL_CALL * calls, (
        f"the patch adds {added} syncs over {calls} UNet calls ({plain.total} without it):\n{syncs.report()}"
    )


# ---- MoLE --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mole_model(pack, sd15, tmp_path_factory):
    """A function mode -> the thin SD1.5 patched by Apply MoLE Gating with two random experts."""
    mole_nodes = importlib.import_module(f"{hostenv.PACK_MODULE}.nodes.mole_nodes")
    root = tmp_path_factory.mktemp("mole_sync")
    layers, kohya = mw.target_layers(sd15.model), mw.kohya_names(sd15.model, "diffusers")
    mw.write_lora(root / "face.safetensors", layers, kohya, rank=2, seed=1)
    mw.write_lora(root / "hand.safetensors", layers, kohya, rank=2, seed=2)
    mw.write_released_gates(root / "gates.safetensors", layers, kohya)
    with model_folders(loras=root, mole=root):
        experts = mole_nodes.LoadMoLEExperts.execute(
            "face.safetensors", "face", 1.0, "hand.safetensors", "hand", 1.0
        ).result[0]
        yield lambda mode: mole_nodes.ApplyMoLEGating.execute(
            sd15.model, experts, "gates.safetensors", mode, 1.0
        ).result[0]


# The (cfg, batch) pairs are the MoA tests' too: the unpatched runs are counted once per pair.
@pytest.mark.parametrize("mode,cfg,batch", [("both", 2.0, 1), ("local", 1.0, 2), ("global", 2.0, 2)])
def test_mole_adds_no_sync_per_layer_call(sd15, mole_model, mode, cfg, batch):
    positive, negative = encode_text(sd15.clip, PROMPT), encode_text(sd15.clip, "")
    assert_no_sync_per_layer(sd15, mole_model(mode), positive, negative, cfg, batch)


# ---- MoA ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moa_router(pack, sd15, tmp_path_factory):
    moa_nodes = importlib.import_module(f"{hostenv.PACK_MODULE}.nodes.moa_nodes")
    root = tmp_path_factory.mktemp("moa_sync")
    (root / "moa_sd15.safetensors").symlink_to(aw.cached_moa_file(sd15.model, seed=11))
    with model_folders(moa=root), torch.inference_mode():
        yield moa_nodes, moa_nodes.LoadMoARouter.execute("moa_sd15.safetensors").result[0]


def image(seed: int) -> torch.Tensor:
    return torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("subjects,cfg,batch", [(1, 1.0, 2), (1, 2.0, 2), (2, 2.0, 1)])
def test_moa_adds_no_sync_per_layer_call(sd15, moa_router, clip_vision_l14, subjects, cfg, batch):
    moa_nodes, moa = moa_router
    images = {f"image_{i + 1}": image(20 + i) for i in range(subjects)}
    with torch.inference_mode():
        patched, positive = moa_nodes.MoASubjectInject.execute(
            model=sd15.model,
            moa=moa,
            clip=sd15.clip,
            clip_vision=clip_vision_l14,
            text=PROMPT,
            subject_words="man" if subjects == 1 else "man, woman",
            subject_weights="1.0",
            strength=1.0,
            start_percent=0.0,
            end_percent=1.0,
            **images,
        ).result
    assert_no_sync_per_layer(sd15, patched, positive, encode_text(sd15.clip, ""), cfg, batch)
