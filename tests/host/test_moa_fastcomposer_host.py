"""MoA from FastComposer's weights through the real host: the converter on a random state dict in
the exact layout of FastComposer's pytorch_model.bin (helpers.fastcomposer_weights), its files
loaded by Load MoA Router and ComfyUI's CLIP vision loader; MoA Subject Inject with them (the
attention router, the image encoder check, FastComposer's image preparation, composition).
The converter's refusals and layout are checked without the host in tests/core."""

from __future__ import annotations

import copy
import importlib

import hostenv
import pytest
import torch
from helpers import fastcomposer_weights as fw
from helpers import random_models as rm
from helpers.fixtures import model_folders

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sd15(sd15_full):
    """FastComposer's weights fit SD1.5's own widths: this module runs on the full random SD1.5."""
    return sd15_full


@pytest.fixture(scope="module")
def moa_nodes(pack):
    return importlib.import_module(f"{hostenv.PACK_MODULE}.nodes.moa_nodes")


@pytest.fixture(scope="module")
def fastcomposer(sd15, tmp_path_factory):
    """(folder with pytorch_model.bin, its state dict, the postfuse module it holds)."""
    root = tmp_path_factory.mktemp("fastcomposer")
    state, postfuse = fw.fastcomposer_state_dict(sd15.model, rm.clip_vision_vit_l14())
    torch.save(state, root / "pytorch_model.bin")
    return root, state, postfuse


@pytest.fixture(scope="module")
def converted(fastcomposer, tmp_path_factory):
    """The converter run as a user runs it, on the folder: models/moa and models/clip_vision files."""
    from training import convert_fastcomposer

    root = tmp_path_factory.mktemp("fastcomposer_models")
    out, vision = (
        root / "moa" / "fastcomposer.safetensors",
        root / "clip_vision" / "fastcomposer_image_encoder.safetensors",
    )
    convert_fastcomposer.main([str(fastcomposer[0]), "--out", str(out), "--clip-vision-out", str(vision)])
    with model_folders(moa=root / "moa", clip_vision=root / "clip_vision"):
        yield root, out, vision


def test_converted_files_load_and_hold_fastcomposers_weights(moa_nodes, sd15, fastcomposer, converted):
    import comfy.utils

    import nodes
    from mixture_core.moa import FastComposerFusion, SubjectBinding, bind_subjects
    from mixture_core.moa_files import vision_encoder_fingerprint

    _, state, postfuse = fastcomposer
    with torch.inference_mode():
        loaded = moa_nodes.LoadMoARouter.execute("fastcomposer.safetensors").result[0]
        (clip_vision,) = nodes.CLIPVisionLoader().load_clip("fastcomposer_image_encoder.safetensors")
    moa = loaded.model
    moa_nodes.check_moa_fits(sd15.model, loaded)  # every layer exists in SD1.5 with its widths
    assert len(moa.layer_ids) == 32 and moa.fusion_kind == "fastcomposer" and moa.image_preprocess == "fastcomposer"
    router = moa.router_config
    assert router.kind == "attention" and router.prior_steps == 0.2 and router.quantile == 0.98
    assert len(router.map_layers) == 11 and all(x.endswith("attn2") for x in router.map_layers)
    assert not any(
        x.startswith(
            ("input_blocks.1.", "input_blocks.2.", "output_blocks.9.", "output_blocks.10.", "output_blocks.11.")
        )
        for x in router.map_layers
    )  # diffusers down_blocks.0, up_blocks.3

    # Each personalized attention is FastComposer's attention of the same module, by ComfyUI's own
    # diffusers -> SAI names (not the converter's table).
    mapping = comfy.utils.unet_to_diffusers(sd15.model.model.model_config.unet_config)
    checked = 0
    for diffusers, sai in mapping.items():
        module, _, part = sai.rpartition(".attn")
        if ".transformer_blocks." in sai and part[:1] in "12" and ".to_" in sai:
            layer_id, param = f"{module}.attn{part[0]}", part[2:].replace("to_out.0", "to_out")
            assert torch.equal(moa[layer_id].get_parameter(param), state[f"unet.{diffusers}"]), sai
            checked += 1
    assert checked == 32 * 5

    # The fusion is FastComposer's postfuse (the ported module), on real-width random inputs.
    text, image = torch.randn(2, 77, 768), torch.randn(768)
    mask = torch.zeros(2, 77, dtype=torch.bool)
    mask[:, 4] = True
    with torch.no_grad():
        rounded = copy.deepcopy(postfuse)  # the file holds the weights in float16 (the converter's default)
        for p in rounded.parameters():
            p.copy_(p.half().float())
        expected = rounded(text.clone(), image.expand(2, 1, 1, 768), mask, torch.tensor([1, 1]))
        fusion = FastComposerFusion(768, 768, 768)  # the file's fusion in float32 (a copy: the loaded one is shared)
        fusion.load_state_dict({k: v.float() for k, v in moa.fusion.state_dict().items()})
        got = bind_subjects(text, [SubjectBinding(4, image)], fusion, torch.tensor(500.0), 0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    # The clip_vision file is FastComposer's image encoder; the MoA file names it and its fingerprint.
    vision_sd = clip_vision.model.state_dict()
    for k, v in state.items():
        if k.startswith("image_encoder.") and not k.endswith("position_ids"):
            assert torch.equal(vision_sd[k[len("image_encoder.") :]].cpu().to(v.dtype), v), k
    meta = moa.metadata
    assert (
        meta["moa.image_encoder_file"] == "fastcomposer_image_encoder.safetensors"
        and meta["moa.image_encoder_layers"] == "22,23"
    )
    assert meta["moa.image_encoder_fingerprint"] == vision_encoder_fingerprint(vision_sd, [22, 23])


# ---- MoA Subject Inject with the converted files (the attention router) ------------------------

from test_moa_host import encode, image, inject, sample  # noqa: E402  (the MoA host tests' helpers)

PROMPT = "a man and a woman dancing in Paris"


@pytest.fixture(scope="module")
def fc_files(moa_nodes, fastcomposer, converted):
    """(MoA with the attention router and prior_steps 0.2, the same with prior_steps 0, FastComposer's
    CLIP vision): the second is written by a second converter run (--prior-steps 0), so that
    two-step samples mix at their second step."""
    import nodes
    from training import convert_fastcomposer

    root = converted[0]
    convert_fastcomposer.main(
        [
            str(fastcomposer[0] / "pytorch_model.bin"),
            "--out",
            str(root / "moa" / "fc_now.safetensors"),
            "--prior-steps",
            "0",
        ]
    )
    with torch.inference_mode():
        delayed = moa_nodes.LoadMoARouter.execute("fastcomposer.safetensors").result[0]
        now = moa_nodes.LoadMoARouter.execute("fc_now.safetensors").result[0]
        (clip_vision,) = nodes.CLIPVisionLoader().load_clip("fastcomposer_image_encoder.safetensors")
    return delayed, now, clip_vision


def sigma_spy(seen):
    """An output patch recording (sigma, output) of each call."""

    def patch(out, extra_options):
        seen.append((float(extra_options["sigmas"].reshape(-1)[0]), out.clone()))
        return out

    return patch


def spied(model):
    """A clone with spies before (the prior's output) and after (MoA's) every output patch."""
    model = model.clone()
    prior, mixed = [], []
    patches = model.model_options["transformer_options"]["patches"]
    for attn in ("attn1", "attn2"):
        patches[f"{attn}_output_patch"].insert(0, sigma_spy(prior))
        patches[f"{attn}_output_patch"].append(sigma_spy(mixed))
    return model, prior, mixed


def test_attention_router_runs_the_prior_first_then_mixes(moa_nodes, sd15, fc_files):
    """5 steps with prior_steps 0.2: the calls before 20% of the schedule, and the first call
    (no maps of a previous step yet), are bit-identical to the prior in every layer; later
    steps mix in every layer (the maps cover the random model's image)."""
    delayed, _, clip_vision = fc_files
    patched, positive = inject(
        moa_nodes, sd15, delayed, clip_vision, [image(1), image(2)], words="man, woman", text=PROMPT
    )
    model, prior, mixed = spied(patched)
    out = sample(model, positive, encode(sd15.clip, ""), steps=5)
    assert torch.isfinite(out).all() and len(prior) == len(mixed) == 5 * 32  # cond and uncond in one call per step
    start = float(sd15.model.get_model_object("model_sampling").percent_to_sigma(0.2))
    sigmas = sorted({s for s, _ in prior}, reverse=True)
    assert sigmas[0] > start > sigmas[-1]
    for (sigma, a), (_, b) in zip(prior, mixed):
        if sigma > start or sigma == sigmas[0]:
            assert torch.equal(a, b)
    late = [(a, b) for (sigma, a), (_, b) in zip(prior, mixed) if sigma < start and sigma != sigmas[0]]
    assert late and all(not torch.equal(a, b) for a, b in late)


def test_fastcomposer_file_needs_its_image_encoder_and_strength_zero_is_the_prior(moa_nodes, sd15, fc_files):
    import comfy.clip_vision

    delayed, now, clip_vision = fc_files
    openai = comfy.clip_vision.load(
        str(rm.clip_vision_vit_l14())
    )  # the same tower, but not FastComposer's layers 22-23
    with torch.no_grad():
        openai.model.vision_model.encoder.layers[23].mlp.fc2.bias.add_(0.01)
    with pytest.raises(
        ValueError,
        match="clip_vision: the MoA file fastcomposer.safetensors was made with its own image "
        "encoder, fastcomposer_image_encoder.safetensors .* Load fastcomposer_image_encoder",
    ):
        inject(moa_nodes, sd15, delayed, openai, image(1))
    model, positive = inject(moa_nodes, sd15, now, clip_vision, image(1), strength=0.0)
    negative = encode(sd15.clip, "")
    assert torch.equal(
        sample(model, positive, negative, steps=2), sample(sd15.model, encode(sd15.clip, PROMPT), negative, steps=2)
    )


def test_subject_images_are_padded_not_cropped(moa_nodes, sd15, fc_files):
    """Two wide images that differ only at their far sides: ComfyUI's center crop never sees the
    sides (same embedding), FastComposer's preparation (pad to a square) does."""
    _, _, clip_vision = fc_files
    wide = image(3, size=(128, 64))
    other = wide.clone()
    other[:, :, :8] = 1.0 - other[:, :, :8]
    other[:, :, -8:] = 0.0
    with torch.inference_mode():
        cropped = [clip_vision.encode_image(x).image_embeds for x in (wide, other)]  # ComfyUI's own preprocessing
        padded = [moa_nodes.encode_subject_images(clip_vision, [("image_1", x)]) for x in (wide, other)]
    assert torch.equal(cropped[0], cropped[1])
    assert not torch.allclose(padded[0], padded[1], atol=1e-4)


def test_attention_router_composes_with_lora_controlnet_and_mole(moa_nodes, sd15, fc_files, tmp_path):
    """LoRA Loader under MoA, a ControlNet on its conditioning and MoLE on top, 2 steps: MoA
    still mixes at the second step in every layer, and the sample is finite."""
    import comfy.controlnet
    import comfy.sd
    import comfy.utils
    from helpers import mole_weights as mw

    import nodes

    _, now, clip_vision = fc_files
    layers, kohya = mw.target_layers(sd15.model), mw.kohya_names(sd15.model, "diffusers")
    (tmp_path / "loras").mkdir(), (tmp_path / "mole").mkdir()
    for name, seed in (("fc_style", 31), ("fc_face", 32), ("fc_hand", 33)):
        mw.write_lora(tmp_path / "loras" / f"{name}.safetensors", layers, kohya, seed=seed)
    mw.write_pack_gates(tmp_path / "mole" / "fc_gates.safetensors", layers)
    mole_nodes = importlib.import_module(f"{hostenv.PACK_MODULE}.nodes.mole_nodes")
    with model_folders(loras=tmp_path / "loras", mole=tmp_path / "mole"):
        lora = comfy.utils.load_torch_file(str(tmp_path / "loras" / "fc_style.safetensors"), safe_load=True)
        lora_model, lora_clip = comfy.sd.load_lora_for_models(sd15.model, sd15.clip, lora, 0.7, 0.7)
        patched, positive = inject(
            moa_nodes,
            sd15,
            now,
            clip_vision,
            [image(1), image(2)],
            words="man, woman",
            text=PROMPT,
            model=lora_model,
            clip=lora_clip,
        )
        experts = mole_nodes.LoadMoLEExperts.execute(
            "fc_face.safetensors", "face", 1.0, "fc_hand.safetensors", "hand", 1.0
        ).result[0]
        both = mole_nodes.apply_mole(patched, experts, "fc_gates.safetensors")
    control = comfy.controlnet.load_controlnet(str(rm.sd15_controlnet()))
    negative = encode(lora_clip, "")
    with torch.inference_mode():
        pos_cn, neg_cn = nodes.ControlNetApplyAdvanced().apply_controlnet(
            positive, negative, control, image(5), 0.8, 0.0, 1.0
        )
    model, prior, mixed = spied(both)
    out = sample(model, pos_cn, neg_cn, steps=2)
    assert torch.isfinite(out).all() and len(both.patches) > 0
    second = min(s for s, _ in prior)
    late = [(a, b) for (s, a), (_, b) in zip(prior, mixed) if s == second]
    assert len(late) == 32 and all(not torch.equal(a, b) for a, b in late)


def test_router_maps_draw_the_attention_router(moa_nodes, sd15, fc_files):
    """MoA Record Router / MoA Router Maps on the attention router: the last step's maps are drawn,
    and the recorded prior weight is below 1 where the subjects' maps are."""
    visualize = importlib.import_module(f"{hostenv.PACK_MODULE}.nodes.visualize_nodes")
    _, now, clip_vision = fc_files
    patched, positive = inject(moa_nodes, sd15, now, clip_vision, [image(1), image(2)], words="man, woman", text=PROMPT)
    recorded = visualize.record_moa_router(patched)
    latent = sample(recorded, positive, encode(sd15.clip, ""), steps=2)
    images = torch.rand(1, 64, 64, 3)
    maps = visualize.draw_router_maps(recorded, images, "mean", "last", 0, 0.6)
    assert maps.shape == (1, 64, 64, 3) and torch.isfinite(latent).all()
    recording = recorded.get_attachment(visualize.ROUTER_KEY)
    last = [m for (step, _), m in recording.maps.items() if step == len(recording.sigmas) - 1]
    assert len(last) == 32 and min(float(m.min()) for m in last) < 1.0


# ---- FastComposer's pytorch_model.bin in models/moa, no command -----------------------------------


@pytest.fixture(scope="module")
def loading(pack):
    return importlib.import_module(f"{hostenv.PACK_MODULE}.nodes.moa_loading")


@pytest.fixture(scope="module")
def bin_models(fastcomposer, tmp_path_factory):
    """models/moa as a user fills it: FastComposer's pytorch_model.bin as downloaded (a link to the
    random one), a .bin of another layout and a pickle of another kind (.ckpt)."""
    import os
    import shutil

    root = tmp_path_factory.mktemp("bin_models") / "moa"
    root.mkdir()
    try:
        os.link(fastcomposer[0] / "pytorch_model.bin", root / "pytorch_model.bin")
    except OSError:
        shutil.copy2(fastcomposer[0] / "pytorch_model.bin", root / "pytorch_model.bin")
    torch.save({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, root / "other.bin")
    torch.save({"state_dict": {}}, root / "old.ckpt")
    return root


def _umask():
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_pytorch_model_bin_runs_with_no_terminal_step(moa_nodes, loading, sd15, fc_files, bin_models):
    """Load MoA Router lists and reads pytorch_model.bin (first, and the default), converting with a
    progress bar into a cache beside it (files 0644 under umask 022, listed nowhere); its MOA_WEIGHTS
    hold the command's weights and FastComposer's encoder, and a graph with clip_vision unwired
    samples exactly as the command's files with Load CLIP Vision do."""
    import os
    import stat

    import comfy.utils

    from mixture_core.moa_files import vision_encoder_fingerprint

    delayed, _, clip_vision = fc_files  # the command's files: the same conversion and default router
    calls = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, *_, **__: calls.append((value, total)))
    try:
        with model_folders(moa=bin_models):
            schema = moa_nodes.LoadMoARouter.GET_SCHEMA()
            combo = schema.inputs[0]
            assert combo.options[0] == combo.default == "pytorch_model.bin" and "other.bin" in combo.options
            assert "old.ckpt" not in combo.options
            with torch.inference_mode():
                loaded = moa_nodes.LoadMoARouter.execute("pytorch_model.bin").result[0]
            assert moa_nodes.moa_choices() == combo.options  # the cache is not offered
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert len(calls) == 34 and calls[-1] == (34, 34), calls  # 32 layers, the fusion, the image encoder

    assert loaded.path == str(bin_models / "pytorch_model.bin")
    ours, theirs = loaded.model.state_dict(), delayed.model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert loaded.model.router_config == delayed.model.router_config
    expected = delayed.model.metadata["moa.image_encoder_fingerprint"]
    assert vision_encoder_fingerprint(loaded.clip_vision.model.state_dict(), [22, 23]) == expected

    moa_file, encoder_file = loading.cache_paths(loaded.path)
    assert os.path.dirname(moa_file) == str(bin_models / ".moa-cache")
    assert sorted(os.listdir(bin_models / ".moa-cache")) == sorted(map(os.path.basename, (moa_file, encoder_file)))
    for path in (moa_file, encoder_file):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~_umask(), path

    negative = encode(sd15.clip, "")
    model, positive = inject(moa_nodes, sd15, loaded, None, image(1))  # clip_vision unwired
    reference, reference_positive = inject(moa_nodes, sd15, delayed, clip_vision, image(1))
    got = sample(model, positive, negative, steps=3)
    assert torch.equal(got, sample(reference, reference_positive, negative, steps=3))
    assert not torch.equal(got, sample(sd15.model, encode(sd15.clip, "a man"), negative, steps=3))


def test_the_graph_runs_through_the_executor_with_clip_vision_unwired(pack, sd15, bin_models):
    """The API prompt of a MoA graph on pytorch_model.bin, validated and run by ComfyUI's executor,
    with no CLIP vision loader in it."""
    import asyncio

    import execution
    from test_moa_host import _SessionModels, moa_prompt

    import nodes
    from workflows.run import _Server

    extension = asyncio.run(pack.comfy_entrypoint())
    for node in asyncio.run(extension.get_node_list()):
        nodes.NODE_CLASS_MAPPINGS.setdefault(node.GET_SCHEMA().node_id, node)
    _SessionModels.OUTPUT = (sd15.model, sd15.clip, None, sd15.vae)
    nodes.NODE_CLASS_MAPPINGS["MoLEMoATests_SessionModels"] = _SessionModels
    prompt = moa_prompt(seed=1, steps=2, moa_name="pytorch_model.bin", clip_vision=False)
    try:
        with model_folders(moa=bin_models):
            valid, error, _, node_errors = asyncio.run(execution.validate_prompt("bin", prompt, None))
            assert valid, (error, node_errors)
            executor = execution.PromptExecutor(_Server(), cache_args={"lru": 0, "ram": 0})
            executor.execute(prompt, "bin", {}, ["9"])
            assert executor.success, executor.status_messages[-1]
            assert executor.caches.outputs.get("2").outputs[0][0].clip_vision is not None
    finally:
        del nodes.NODE_CLASS_MAPPINGS["MoLEMoATests_SessionModels"]
        _SessionModels.OUTPUT = None


def test_the_next_load_reads_the_cache_until_the_file_changes(moa_nodes, loading, bin_models, monkeypatch):
    """A second load (as after a restart: a new call, nothing held) never enters the conversion;
    a replaced file (another modification time) is converted again and its old cache removed."""
    import os

    path = str(bin_models / "pytorch_model.bin")
    real = loading.convert_fastcomposer
    with model_folders(moa=bin_models):
        first = loading.load_router("pytorch_model.bin")  # converts if the test above did not run

        def entered(p):
            raise AssertionError(f"converted again: {p}")

        monkeypatch.setattr(loading, "convert_fastcomposer", entered)
        again = loading.load_router("pytorch_model.bin")
        ours, theirs = again.model.state_dict(), first.model.state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
        assert again.model.metadata == first.model.metadata and again.clip_vision is not None
        old = loading.cache_paths(path)

        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        converted = []
        monkeypatch.setattr(loading, "convert_fastcomposer", lambda p: converted.append(p) or real(p))
        loading.load_router("pytorch_model.bin")
    assert converted == [path]
    new = loading.cache_paths(path)
    assert new != old and sorted(os.listdir(bin_models / ".moa-cache")) == sorted(map(os.path.basename, new))


def test_a_bin_of_another_layout_is_refused_and_other_pickles_are_not_listed(moa_nodes, bin_models, tmp_path):
    import datetime

    with model_folders(moa=bin_models):
        assert "old.ckpt" not in moa_nodes.moa_choices()
        with pytest.raises(
            ValueError,
            match=r"^other.bin: is not FastComposer's published pytorch_model.bin \(is not FastComposer's SD1.5 "
            r"state dict: \d+ key\(s\) are missing\)\. Load MoA Router reads MoA .safetensors files and "
            r"FastComposer's pytorch_model.bin from https://huggingface.co/mit-han-lab/fastcomposer",
        ):
            moa_nodes.LoadMoARouter.execute("other.bin")
    payload = tmp_path / "moa"
    payload.mkdir()
    torch.save({"postfuse_module.x": datetime.timedelta(days=1)}, payload / "pytorch_model.bin")
    with model_folders(moa=payload), pytest.raises(ValueError, match="pytorch_model.bin: needs more than tensors"):
        moa_nodes.LoadMoARouter.execute("pytorch_model.bin")
    assert not (payload / ".moa-cache").exists()


def test_which_image_encoder_runs(moa_nodes, sd15, fc_files, bin_models):
    """Unwired with a file that brings no encoder: a message saying what to wire. Wired with another
    encoder than the one a .bin brings: a message saying to disconnect it."""
    import comfy.clip_vision

    delayed, _, _ = fc_files
    with pytest.raises(
        ValueError,
        match="clip_vision: the MoA file fastcomposer.safetensors brings no image encoder; wire Load CLIP Vision "
        r"with the CLIP ViT-L/14 the file was trained with \(fastcomposer_image_encoder.safetensors\)",
    ):
        inject(moa_nodes, sd15, delayed, None, image(1))
    with model_folders(moa=bin_models), torch.inference_mode():
        loaded = moa_nodes.LoadMoARouter.execute("pytorch_model.bin").result[0]
    openai = comfy.clip_vision.load(str(rm.clip_vision_vit_l14()))
    with torch.no_grad():
        openai.model.vision_model.encoder.layers[23].mlp.fc2.bias.add_(0.01)
    with pytest.raises(ValueError, match="pytorch_model.bin brings its own image encoder.* Disconnect clip_vision"):
        inject(moa_nodes, sd15, loaded, openai, image(1))
