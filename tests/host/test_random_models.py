"""The random-weight model files of helpers.random_models, checked against the real ComfyUI:
each is detected by the host's own loaders as the intended family, and its random weights give
finite, sanely scaled outputs."""

from __future__ import annotations

import pytest
import torch
from helpers import random_models as rm
from helpers.fixtures import free_host_memory

# The fixtures sd15, sd15_controlnet_path, clip_vision_l14_path, clip_vision_h14_path and sdxl
# come from helpers/fixtures.py through tests/host/conftest.py.


@pytest.fixture(scope="module", autouse=True)
def host():
    return rm.import_host()


def _keys(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}, f.metadata()


def _sane(t: torch.Tensor, lo=0.1, hi=10.0):
    assert torch.isfinite(t).all(), "non-finite values"
    std = t.float().std().item()
    assert lo < std < hi, f"std {std} outside ({lo}, {hi})"
    return std


# ---------------------------------------------------------------------------------- machinery


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MOLE_MOA_TEST_CACHE", str(tmp_path / "c"))
    assert rm.cache_dir() == tmp_path / "c"
    assert (tmp_path / "c").is_dir()
    monkeypatch.delenv("MOLE_MOA_TEST_CACHE")
    assert rm.cache_dir() == rm.Path.home() / ".cache" / "comfyui-mole-moa-tests"


def test_cached_file_is_made_once_and_never_left_half_written(monkeypatch, tmp_path):
    monkeypatch.setenv("MOLE_MOA_TEST_CACHE", str(tmp_path))
    calls = []

    def make():
        calls.append(1)
        return {"w": torch.arange(4, dtype=torch.float32)}, {"k": "v"}

    first = rm._cached("thing_v1.safetensors", make)
    second = rm._cached("thing_v1.safetensors", make)
    assert first == second == tmp_path / "thing_v1.safetensors" and len(calls) == 1
    tensors, metadata = _keys(first)
    assert tensors == {"w": ("F32", (4,))} and metadata == {"k": "v"}

    def broken():
        raise KeyboardInterrupt  # an interrupted run

    with pytest.raises(KeyboardInterrupt):
        rm._cached("broken_v1.safetensors", broken)

    import comfy.utils

    def half_write(sd, path, metadata=None):  # the process dies in the middle of writing
        with open(path, "wb") as f:
            f.write(b"\x00" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(comfy.utils, "save_torch_file", half_write)
    with pytest.raises(KeyboardInterrupt):
        rm._cached("half_v1.safetensors", make)
    (tmp_path / ".half_v1.safetensors.999.tmp").write_bytes(b"\x00")  # left by a killed run
    monkeypatch.undo()
    monkeypatch.setenv("MOLE_MOA_TEST_CACHE", str(tmp_path))
    assert rm._cached("half_v1.safetensors", make).is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [
        "half_v1.safetensors",
        "thing_v1.safetensors",
    ]


def test_random_init_is_seeded_and_scaled():
    def make():
        return torch.nn.Sequential(
            torch.nn.Linear(256, 512),
            torch.nn.LayerNorm(512),
            torch.nn.Conv2d(64, 128, 3),
            torch.nn.Embedding(1000, 64),
            torch.nn.Linear(256, 512),
        )

    a, b, c = rm._randomize_(make(), 7), rm._randomize_(make(), 7), rm._randomize_(make(), 8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["0.weight"], sc["0.weight"])
    assert torch.equal(sa["1.weight"], torch.ones(512)) and torch.equal(sa["1.bias"], torch.zeros(512))
    assert abs(sa["0.weight"].std().item() * 256**0.5 - 1) < 0.05
    assert abs(sa["2.weight"].std().item() * (64 * 9) ** 0.5 - 1) < 0.05
    assert abs(sa["3.weight"].std().item() / 0.02 - 1) < 0.05
    # two layers of the same shape (say q and k) get unrelated numbers
    q, k = sa["0.weight"].flatten(), sa["4.weight"].flatten()
    assert abs(torch.corrcoef(torch.stack([q, k]))[0, 1].item()) < 0.05


# --------------------------------------------------------------------------------------- SD1.5


def test_sd15_checkpoint_has_the_original_layout():
    tensors, metadata = _keys(rm.sd15_checkpoint())
    groups = {"model.diffusion_model.": 0, "cond_stage_model.transformer.text_model.": 0, "first_stage_model.": 0}
    for k in tensors:
        for prefix in groups:
            if k.startswith(prefix):
                groups[prefix] += 1
    # the key counts of the original v1-5-pruned-emaonly checkpoint
    assert groups == {
        "model.diffusion_model.": 686,
        "cond_stage_model.transformer.text_model.": 197,
        "first_stage_model.": 248,
    }
    assert tensors["model.diffusion_model.input_blocks.1.1.proj_in.weight"] == ("F16", (320, 320, 1, 1))
    assert tensors["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (
        "F16",
        (320, 768),
    )
    assert tensors["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] == ("F16", (49408, 768))
    assert tensors["cond_stage_model.transformer.text_model.embeddings.position_ids"] == ("I64", (1, 77))
    assert tensors["first_stage_model.decoder.mid.attn_1.q.weight"] == ("F16", (512, 512, 1, 1))
    assert tensors["alphas_cumprod"] == ("F32", (1000,))
    assert not any(k.startswith("cond_stage_model.transformer.text_projection") or "logit_scale" in k for k in tensors)
    assert metadata["mole_moa_test_model"] == "sd15_checkpoint"


# The 1x1 convolutions of the two ResBlocks where SD1.5 widens (320 -> 640 -> 1280): a block
# that keeps its width has none. Not attention, not a MoLE or MoA target.
WIDENING_SKIPS = {
    f"model.diffusion_model.input_blocks.{block}.0.skip_connection.{p}" for block in (4, 7) for p in ("weight", "bias")
}


def test_thin_sd15_has_every_key_of_sd15_at_width_320():
    """The `sd15` fixture's thin file: SD1.5's key names (less the widening skips), shapes equal
    wherever SD1.5 is at width 320 (its first level, text encoder, VAE), narrower where it widens."""
    full, _ = _keys(rm.sd15_checkpoint())
    thin, metadata = _keys(rm.sd15_thin_checkpoint())
    assert thin.keys() == full.keys() - WIDENING_SKIPS and metadata["mole_moa_test_model"] == "sd15_thin_checkpoint"
    narrower = [k for k in thin if thin[k] != full[k]]
    assert narrower and all(k.startswith("model.diffusion_model.") for k in narrower)
    assert all(max(thin[k][1]) <= max(full[k][1]) and thin[k][0] == full[k][0] for k in narrower)
    assert (
        thin["model.diffusion_model.input_blocks.1.1.proj_in.weight"]
        == full["model.diffusion_model.input_blocks.1.1.proj_in.weight"]
    )
    assert thin["model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"] == ("F16", (320, 768))


def _unet_config_from_header(path):
    """ComfyUI's own detection (model_detection.detect_unet_config) run on the file's shapes only."""
    import comfy.model_detection

    tensors, _ = _keys(path)
    sd = {k: torch.empty(shape, device="meta") for k, (_, shape) in tensors.items()}
    return comfy.model_detection.detect_unet_config(sd, "model.diffusion_model."), sd


def test_full_sd15_file_is_detected_as_sd15():
    import comfy.model_detection

    config, sd = _unet_config_from_header(rm.sd15_checkpoint())
    for k, v in rm.SD15_UNET_CONFIG.items():
        assert config.get(k, v) == v, k
    model_config = comfy.model_detection.model_config_from_unet(sd, "model.diffusion_model.")
    assert type(model_config).__name__ == "SD15"


def test_sd15_checkpoint_loads_as_sd15(sd15):
    import comfy.ldm.models.autoencoder
    import comfy.model_base
    import comfy.sd1_clip

    config = sd15.model.model.model_config
    assert type(config).__name__ == "SD15"
    assert sd15.model.model.model_type == comfy.model_base.ModelType.EPS
    for k, v in rm.SD15_THIN_UNET_CONFIG.items():
        assert config.unet_config.get(k, v) == v, k
    attention = [n for n, _ in sd15.model.model.diffusion_model.named_modules() if n.endswith((".attn1", ".attn2"))]
    assert len(attention) == 32
    assert isinstance(sd15.clip.cond_stage_model, comfy.sd1_clip.SD1ClipModel)
    assert isinstance(sd15.vae.first_stage_model, comfy.ldm.models.autoencoder.AutoencoderKL)
    assert sd15.vae.latent_channels == 4


@pytest.mark.slow  # over ~5 s on 2 CPU cores
def test_sd15_random_weights_are_sane(sd15):
    cond, pooled = sd15.clip.encode_from_tokens(sd15.clip.tokenize("a photo of a person"), return_pooled=True)
    assert cond.shape == (1, 77, 768) and pooled.shape == (1, 768)
    _sane(cond)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=gen)
    unet = sd15.model.model.diffusion_model
    with torch.no_grad():
        for timestep in (1.0, 500.0, 999.0):
            eps = unet(x.to(sd15.model.model.get_dtype()), torch.tensor([timestep]), context=cond)
            assert eps.shape == x.shape
            _sane(eps)
    image = sd15.vae.decode(torch.randn(1, 4, 8, 8, generator=gen))
    assert image.shape == (1, 64, 64, 3)
    assert torch.isfinite(image).all() and image.std() > 0.01


def test_sd15_one_ksampler_step(sd15):
    import nodes

    cond, pooled = sd15.clip.encode_from_tokens(sd15.clip.tokenize("a photo of a person"), return_pooled=True)
    positive = [[cond, {"pooled_output": pooled}]]
    negative = [[torch.zeros_like(cond), {"pooled_output": torch.zeros_like(pooled)}]]
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    out = nodes.common_ksampler(sd15.model, 3, 1, 5.0, "euler", "normal", positive, negative, latent)[0]["samples"]
    again = nodes.common_ksampler(sd15.model, 3, 1, 5.0, "euler", "normal", positive, negative, latent)[0]["samples"]
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
    assert torch.equal(out, again)


def test_sd15_controlnet_has_the_original_layout_and_loads(sd15, sd15_controlnet_path):
    import comfy.cldm.cldm
    import comfy.controlnet

    import nodes

    tensors, _ = _keys(rm.sd15_controlnet())
    thin_keys = {k.replace("control_model.", "model.diffusion_model.", 1) for k in _keys(sd15_controlnet_path)[0]}
    full_keys = {k.replace("control_model.", "model.diffusion_model.", 1) for k in tensors}
    assert thin_keys == full_keys - WIDENING_SKIPS  # the thin one, for the `sd15` UNet
    assert all(k.startswith("control_model.") for k in tensors)
    assert tensors["control_model.input_hint_block.0.weight"] == ("F16", (16, 3, 3, 3))
    assert tensors["control_model.input_hint_block.14.weight"] == ("F16", (320, 256, 3, 3))
    assert tensors["control_model.zero_convs.11.0.weight"] == ("F16", (1280, 1280, 1, 1))
    assert tensors["control_model.middle_block_out.0.weight"] == ("F16", (1280, 1280, 1, 1))
    assert "control_model.zero_convs.12.0.weight" not in tensors
    assert not any(k.startswith(("control_model.output_blocks", "control_model.out.")) for k in tensors)

    control = comfy.controlnet.load_controlnet(str(sd15_controlnet_path))
    assert type(control).__name__ == "ControlNet"
    assert isinstance(control.control_model, comfy.cldm.cldm.ControlNet)
    assert control.control_model.model_channels == 320 and len(control.control_model.zero_convs) == 12

    cond, pooled = sd15.clip.encode_from_tokens(sd15.clip.tokenize("a person"), return_pooled=True)
    plain = [[cond, {"pooled_output": pooled}]]
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    positive, negative = nodes.ControlNetApplyAdvanced().apply_controlnet(
        plain, plain, control, hint, 1.0, 0.0, 1.0, vae=sd15.vae
    )
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    with_control = nodes.common_ksampler(sd15.model, 3, 1, 1.0, "euler", "normal", positive, negative, latent)[0][
        "samples"
    ]
    without = nodes.common_ksampler(sd15.model, 3, 1, 1.0, "euler", "normal", plain, plain, latent)[0]["samples"]
    assert torch.isfinite(with_control).all()
    assert (with_control - without).abs().max() > 1e-3  # the control actually reached the UNet


# ---------------------------------------------------------------------------------- CLIP vision


@pytest.mark.slow  # over ~5 s on 2 CPU cores
def test_clip_vision_l14_is_detected_and_encodes(clip_vision_l14_path):
    import comfy.clip_vision

    tensors, _ = _keys(clip_vision_l14_path)
    assert tensors["visual_projection.weight"] == ("F16", (768, 1024))
    assert tensors["vision_model.embeddings.position_embedding.weight"] == ("F16", (257, 1024))
    assert (
        "vision_model.encoder.layers.23.mlp.fc2.weight" in tensors
        and "vision_model.encoder.layers.24.mlp.fc2.weight" not in tensors
    )

    vision = comfy.clip_vision.load(str(clip_vision_l14_path))
    vm = vision.model.vision_model
    assert len(vm.encoder.layers) == 24 and vision.image_size == 224
    assert vision.model.visual_projection.weight.shape == (768, 1024)
    out = vision.encode_image(torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(2)))
    assert out.image_embeds.shape == (1, 768)
    _sane(out.image_embeds)
    assert out.penultimate_hidden_states.shape == (1, 257, 1024)
    assert torch.isfinite(out.penultimate_hidden_states).all()
    del vision, vm
    free_host_memory()


def test_clip_vision_h14_is_detected_as_h_not_l(clip_vision_h14_path):
    import comfy.clip_vision

    tensors, _ = _keys(clip_vision_h14_path)
    assert tensors["visual_projection.weight"] == ("F16", (1024, 1280))
    vision = comfy.clip_vision.load(str(clip_vision_h14_path))
    assert len(vision.model.vision_model.encoder.layers) == 32
    assert vision.model.visual_projection.weight.shape == (1024, 1280)  # image_embeds of width 1024, not 768
    del vision
    free_host_memory()


# ---------------------------------------------------------------------------------------- SDXL


def _detected_sdxl(sd, config):
    import comfy.model_detection

    detected = comfy.model_detection.detect_unet_config(sd, "")
    assert type(comfy.model_detection.model_config_from_unet_config(detected, sd)).__name__ == "SDXL"
    for k, v in config.items():
        assert detected.get(k, v) == v, k


def test_sdxl_config_is_sdxls_layout():
    """SDXL's real widths, on a meta-device build (no memory): what the thin fixture narrows."""
    import comfy.supported_models

    sd = comfy.supported_models.SDXL(dict(rm.SDXL_UNET_CONFIG)).get_model({}, device="meta").diffusion_model
    sd = sd.state_dict()
    _detected_sdxl(sd, rm.SDXL_UNET_CONFIG)
    assert sd["label_emb.0.0.weight"].shape == (1280, 2816)
    assert sd["input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight"].shape == (1280, 2048)
    assert sd["input_blocks.4.1.proj_in.weight"].shape == (640, 640)  # use_linear_in_transformer
    assert 2.5e9 < sum(t.numel() for t in sd.values()) < 2.6e9


@pytest.mark.slow
def test_sdxl_model_has_the_sdxl_layout(sdxl):
    import comfy.model_base
    import comfy.supported_models

    sd = sdxl.model.model.diffusion_model.state_dict()
    _detected_sdxl(sd, rm.SDXL_THIN_UNET_CONFIG)
    assert isinstance(sdxl.model.model, comfy.model_base.SDXL)
    full = comfy.supported_models.SDXL(dict(rm.SDXL_UNET_CONFIG)).get_model({}, device="meta").diffusion_model
    widening_skips = {f"input_blocks.{b}.0.skip_connection.{p}" for b in (4, 7) for p in ("weight", "bias")}
    assert sd.keys() == full.state_dict().keys() - widening_skips  # SDXL's names, at width 320
    assert sd["label_emb.0.0.weight"].shape == (320 * 4, 2816)
    assert sd["input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight"].shape == (320, 2048)
    assert 2.5e8 < sum(t.numel() for t in sd.values()) < 3.0e8


@pytest.mark.slow
def test_sdxl_model_runs_one_ksampler_step(sdxl):
    import nodes

    assert sdxl.positive[0][0].shape == (1, 77, 2048) and sdxl.positive[0][1]["pooled_output"].shape == (1, 1280)
    out = nodes.common_ksampler(
        sdxl.model, 0, 1, 5.0, "euler", "normal", sdxl.positive, sdxl.negative, sdxl.latent(64, 64)
    )[0]["samples"]
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
