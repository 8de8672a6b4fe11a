"""The visualization nodes through the real host: MoLE Record Gates + MoLE Gate Maps and MoA
Record Router + MoA Router Maps record a real sampling run and draw it; the pictures have the
expected sizes and come from the run (other gate/router weights give other pictures)."""

from __future__ import annotations

import copy
import importlib

import hostenv
import pytest
import torch
from helpers import moa_weights as aw
from helpers import mole_weights as mw
from helpers import random_models as rm
from helpers.fixtures import model_folders

pytestmark = pytest.mark.slow

W, H = 64, 48  # non-square on purpose: maps must keep the latent's aspect


@pytest.fixture(scope="module")
def nodes(pack):
    return {
        name: importlib.import_module(f"{hostenv.PACK_MODULE}.nodes.{name}")
        for name in ("mole_nodes", "moa_nodes", "visualize_nodes")
    }


@pytest.fixture(scope="module")
def folders(sd15, tmp_path_factory):
    root = tmp_path_factory.mktemp("visualize_models")
    layers = mw.target_layers(sd15.model)
    kohya = mw.kohya_names(sd15.model, "diffusers")
    mw.write_lora(root / "vis_face.safetensors", layers, kohya, seed=31)
    mw.write_lora(root / "vis_hand.safetensors", layers, kohya, seed=32)
    mw.write_pack_gates(root / "vis_gates_a.safetensors", layers, seed=33)
    mw.write_pack_gates(root / "vis_gates_b.safetensors", layers, seed=34)
    (root / "vis_moa.safetensors").symlink_to(aw.cached_moa_file(sd15.model, seed=11))
    with model_folders(loras=root, mole=root, moa=root):
        yield root


def run(sd15, model, positive=None, steps=3, cfg=2.0):
    """Sample (steps, cfg > 1 so cond and uncond rows share each call) and decode."""
    import nodes as comfy_nodes

    positive = positive or comfy_nodes.CLIPTextEncode().encode(sd15.clip, "a man waving")[0]
    negative = comfy_nodes.CLIPTextEncode().encode(sd15.clip, "")[0]
    latent = {"samples": torch.zeros(1, 4, H // 8, W // 8)}
    with torch.inference_mode():
        (out,) = comfy_nodes.common_ksampler(model, 5, steps, cfg, "euler", "normal", positive, negative, latent)
        return comfy_nodes.VAEDecode().decode(sd15.vae, out)[0]


def mole_model(nodes, sd15, gates):
    mole = nodes["mole_nodes"]
    experts = mole.LoadMoLEExperts.execute(
        "vis_face.safetensors", "face", 1.0, "vis_hand.safetensors", "hand", 1.0
    ).result[0]
    return mole.ApplyMoLEGating.execute(sd15.model, experts, gates, "both", 1.0).result[0]


def gate_pictures(nodes, sd15, gates, steps=3):
    vis = nodes["visualize_nodes"]
    recorded = vis.MoLERecordGates.execute(mole_model(nodes, sd15, gates)).result[0]
    images = run(sd15, recorded, steps=steps)
    plot, maps = vis.MoLEGateMaps.execute(recorded, images, "first, last", 0, 0.6).result
    return recorded, images, plot, maps


def test_mole_gate_maps_come_from_the_run(nodes, sd15, folders):
    recorded, images, plot, maps = gate_pictures(nodes, sd15, "vis_gates_a.safetensors")
    recording = recorded.get_attachment(nodes["visualize_nodes"].GATES_KEY)
    assert len(recording.sigmas) == 3  # one entry per sampling step (cond and uncond share the call)
    assert len(recording.layers_seen) == 192  # every MoLE layer reported its gates
    gates = recording.global_gates()
    assert gates.shape == (3, 1, 2) and bool(((gates > 0) & (gates < 1)).all())
    assert plot.shape == (1, 320, 512, 3) and maps.shape == (2 * 2, H, W, 3)  # steps x experts, image size
    assert images.shape == (1, H, W, 3)
    assert 0 <= float(maps.min()) and float(maps.max()) <= 1

    _, _, plot_b, maps_b = gate_pictures(nodes, sd15, "vis_gates_b.safetensors")
    assert not torch.allclose(maps, maps_b, atol=1e-3)  # other gate weights, other local maps
    assert not torch.equal(plot, plot_b)  # and other global gates


def test_mole_recording_costs_the_plain_model_nothing(nodes, sd15, folders):
    """Record Gates leaves the model it was given as it was; a new run clears the recording."""
    plain = mole_model(nodes, sd15, "vis_gates_a.safetensors")
    before = dict(plain.object_patches)
    vis = nodes["visualize_nodes"]
    recorded = vis.MoLERecordGates.execute(plain).result[0]
    assert plain.object_patches == before and plain.get_attachment(vis.GATES_KEY) is None
    assert torch.equal(run(sd15, plain, steps=1), run(sd15, recorded, steps=1))  # recording changes no pixel
    run(sd15, recorded, steps=2)
    assert len(recorded.get_attachment(vis.GATES_KEY).sigmas) == 2
    with pytest.raises(ValueError, match="Apply MoLE Gating"):
        vis.MoLERecordGates.execute(sd15.model)
    with pytest.raises(ValueError, match="MoLE Record Gates"):
        vis.MoLEGateMaps.execute(plain, torch.zeros(1, H, W, 3), "first", 0, 0.6)
    with pytest.raises(ValueError, match="outside"):
        vis.MoLEGateMaps.execute(recorded, torch.zeros(1, H, W, 3), "5", 0, 0.6)


def router_pictures(nodes, sd15, moa, clip_vision, layers="mean"):
    vis, moa_nodes = nodes["visualize_nodes"], nodes["moa_nodes"]
    subject = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        model, positive = moa_nodes.MoASubjectInject.execute(
            model=sd15.model,
            moa=moa,
            clip=sd15.clip,
            clip_vision=clip_vision,
            text="a man waving",
            subject_words="man",
            image_1=subject,
            subject_weights="1.0",
            strength=1.0,
            start_percent=0.0,
            end_percent=1.0,
        ).result
    recorded = vis.MoARecordRouter.execute(model).result[0]
    images = run(sd15, recorded, positive)
    return recorded, vis.MoARouterMaps.execute(recorded, images, layers, "first, middle, last", 0, 0.6).result[0]


def test_moa_router_maps_come_from_the_run(nodes, sd15, folders):
    import comfy.clip_vision

    vis = nodes["visualize_nodes"]
    clip_vision = comfy.clip_vision.load(str(rm.clip_vision_vit_l14()))
    with torch.inference_mode():
        moa = nodes["moa_nodes"].LoadMoARouter.execute("vis_moa.safetensors").result[0]
    recorded, maps = router_pictures(nodes, sd15, moa, clip_vision)
    recording = recorded.get_attachment(vis.ROUTER_KEY)
    assert recording.layers() == list(range(32))  # every attention layer of SD1.5
    assert maps.shape == (3, H, W, 3)  # three steps, the mean over layers
    _, per_layer = router_pictures(nodes, sd15, moa, clip_vision, layers="0, 31")
    assert per_layer.shape == (3 * 2, H, W, 3)

    other = copy.deepcopy(moa)
    aw.perturb_(other.model, seed=99)
    _, other_maps = router_pictures(nodes, sd15, other, clip_vision)
    assert not torch.allclose(maps, other_maps, atol=1e-3)  # other routers, other maps
    with pytest.raises(ValueError, match="MoA Subject Inject"):
        vis.MoARecordRouter.execute(sd15.model)
