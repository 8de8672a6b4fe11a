"""MoA through the real ComfyUI host: Load MoA Router and MoA Subject Inject with a random SD1.5
checkpoint, a random CLIP ViT-L/14 vision model and random MoA files in the pack's format.

Samples are 64x64 px (8x8 latents), one step, run under torch.inference_mode() as ComfyUI runs
its nodes. The unpatched model's latent is sampled once (base_latent) and compared against.
"""

from __future__ import annotations

import asyncio
import importlib
import logging

import hostenv
import pytest
import torch
from helpers import moa_weights as aw
from helpers import mole_weights as mw
from helpers import random_models as rm
from helpers.fixtures import model_folders

pytestmark = pytest.mark.slow

PROMPT = "a man and a woman dancing in Paris"
SEED = 7


# ---- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture(scope="module")
def moa_nodes(pack):
    return importlib.import_module(f"{hostenv.PACK_MODULE}.nodes.moa_nodes")


@pytest.fixture(scope="module")
def moa_patch(pack):
    return importlib.import_module(f"{hostenv.PACK_MODULE}.nodes.moa_patch")


@pytest.fixture(scope="module")
def moa_dir(sd15, tmp_path_factory):
    """A folder registered as models/moa with a random MoA file for the SD1.5 model (made once
    and cached) and the bad ones: another base family, another width."""
    from mixture_core.moa import AttentionShape

    root = tmp_path_factory.mktemp("moa_models") / "moa"
    root.mkdir()
    (root / "moa_sd15.safetensors").symlink_to(aw.cached_moa_file(sd15.model, seed=11))
    first = ["input_blocks.1.1.transformer_blocks.0.attn1", "input_blocks.1.1.transformer_blocks.0.attn2"]
    aw.write_moa_file(root / "moa_sdxl_family.safetensors", sd15.model, seed=12, family="sdxl", layers=first)
    # SD2.x-like cross-attention (1024-wide text) under SD1.5's layer ids: the wrong width.
    shapes = {first[0]: AttentionShape(320, 320, 8, 40), first[1]: AttentionShape(320, 1024, 8, 40)}
    aw.write_moa_for_shapes(root / "moa_wrong_width.safetensors", shapes, text_dim=1024)
    with model_folders(moa=root):
        yield root


def _shapes(model):
    return {
        p: (m.to_q.weight.shape[1], m.to_k.weight.shape[1])
        for p, m in model.model.diffusion_model.named_modules()
        if p.endswith(("attn1", "attn2"))
    }


@pytest.fixture(scope="module")
def moa(moa_nodes, moa_dir):
    with torch.inference_mode():
        return moa_nodes.LoadMoARouter.execute("moa_sd15.safetensors").result[0]


@pytest.fixture(scope="module")
def clip_l14():
    import comfy.clip_vision

    return comfy.clip_vision.load(str(rm.clip_vision_vit_l14()))


@pytest.fixture(scope="module")
def clip_h14():
    import comfy.clip_vision

    return comfy.clip_vision.load(str(rm.clip_vision_vit_h14()))


def image(seed: int, size=(64, 64)) -> torch.Tensor:
    """A seeded random IMAGE (1, H, W, 3) in [0, 1]: a subject photo as Load Image gives it."""
    return torch.rand(1, size[1], size[0], 3, generator=torch.Generator().manual_seed(seed))


_ENCODED = {}


def encode(clip, text):
    """CLIPTextEncode, once per (clip, text) in this module."""
    import nodes

    key = (id(clip), text)
    if key not in _ENCODED:
        with torch.inference_mode():
            _ENCODED[key] = (clip, nodes.CLIPTextEncode().encode(clip, text)[0])
    return _ENCODED[key][1]


@pytest.fixture(scope="module")
def negative(sd15):
    return encode(sd15.clip, "")


def sample(model, positive, negative, cfg=2.0, steps=1, width=64, height=64, batch=1, seed=SEED):
    import nodes

    latent = {"samples": torch.zeros(batch, 4, height // 8, width // 8)}
    with torch.inference_mode():
        (out,) = nodes.common_ksampler(model, seed, steps, cfg, "euler", "normal", positive, negative, latent)
    return out["samples"]


def inject(moa_nodes, sd15, moa, clip_vision, images, words="man", text=PROMPT, model=None, clip=None, **kw):
    """MoA Subject Inject as ComfyUI calls it: (patched model, positive conditioning)."""
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    named = {f"image_{i + 1}": im for i, im in enumerate(images)}
    args = dict(subject_weights="1.0", strength=1.0, start_percent=0.0, end_percent=1.0)
    args.update(kw)
    with torch.inference_mode():
        return moa_nodes.MoASubjectInject.execute(
            model=model if model is not None else sd15.model,
            moa=moa,
            clip=clip if clip is not None else sd15.clip,
            clip_vision=clip_vision,
            text=text,
            subject_words=words,
            image_1=named.pop("image_1", None),
            **named,
            **args,
        ).result


def moa_patch_of(model, moa_patch):
    """The one MoAPatch of a patched model (the public accessor)."""
    found = moa_patch.find_moa_patches(model)
    assert len(found) == 1
    return found[0]


def patch_counts(model):
    to = model.model_options["transformer_options"]
    return (
        {k: len(v) for k, v in to.get("patches", {}).items()},
        {k: dict(v) for k, v in to.get("patches_replace", {}).items()},
        dict(model.object_patches),
        {k: len(v) for k, v in model.additional_models.items()},
    )


@pytest.fixture(scope="module")
def base_state(sd15):
    return patch_counts(sd15.model)


@pytest.fixture(scope="module")
def base_latent(sd15, negative):
    """The unpatched model's sample of PROMPT (cfg 2: cond and uncond batched)."""
    return sample(sd15.model, encode(sd15.clip, PROMPT), negative)


@pytest.fixture(scope="module")
def moa_one(moa_nodes, sd15, moa, clip_l14):
    """(model, positive): one subject, "man", bound to image(1). Shared: clone before patching."""
    return inject(moa_nodes, sd15, moa, clip_l14, image(1))


@pytest.fixture(scope="module")
def moa_two(moa_nodes, sd15, moa, clip_l14):
    """(model, positive): "man" bound to image(1), "woman" to image(2) at weight 0.8."""
    return inject(moa_nodes, sd15, moa, clip_l14, [image(1), image(2)], words="man, woman", subject_weights="1.0, 0.8")


@pytest.fixture(scope="module")
def moa_one_latent(moa_one, negative):
    return sample(moa_one[0], moa_one[1], negative)


def mark_of(entry):
    return entry[1].get(importlib.import_module(f"{hostenv.PACK_MODULE}.nodes.moa_patch").SUBJECTS_KEY)


def spy(seen):
    """An attn1/attn2 output patch that records the output it sees."""
    return lambda out, extra_options: (seen.append(out.clone()), out)[1]


# ---- registration and parsing (no sampling) --------------------------------------------------


def test_nodes_are_in_the_extension(pack, moa_nodes):
    ext_mod = importlib.import_module(f"{hostenv.PACK_MODULE}.nodes.extension")
    node_list = asyncio.run(ext_mod.MixtureExpertsExtension().get_node_list())
    schemas = {n.define_schema().node_id: n.define_schema() for n in node_list}
    assert schemas["MoA_LoadRouter"].display_name == "Load MoA Router"
    assert schemas["MoA_SubjectInject"].display_name == "MoA Subject Inject"
    assert {"MoLE_LoadExperts", "MoLE_ApplyGating"} <= set(schemas)  # the MoLE nodes are still there
    inputs = [i.id for i in schemas["MoA_SubjectInject"].inputs]
    assert inputs[:7] == ["model", "moa", "clip", "clip_vision", "text", "subject_words", "image_1"]
    assert {
        "image_2",
        "image_3",
        "image_4",
        "morph_image",
        "morph",
        "timelapse_word",
        "timelapse",
        "edit_subject",
    } <= set(inputs)
    assert [o.io_type for o in schemas["MoA_SubjectInject"].outputs] == ["MODEL", "CONDITIONING"]


def test_router_file_loads_with_every_layer(moa, sd15):
    assert len(moa.model.layer_ids) == 32 == len(_shapes(sd15.model))
    assert moa.model.base_family == "sd15" and moa.path.endswith("moa_sd15.safetensors")


def test_block_ids_map_to_the_real_module_names(moa_patch, sd15):
    """ComfyUI's (block, block_index) of every SD1.5 attention maps back to its module path."""
    locations = moa_patch.block_locations(moa_patch.attention_modules(sd15.model))
    assert len(locations) == 32
    assert locations[(("input", 1), 0, "attn1")] == "input_blocks.1.1.transformer_blocks.0.attn1"
    assert locations[(("middle", 0), 0, "attn2")] == "middle_block.1.transformer_blocks.0.attn2"
    assert locations[(("output", 11), 0, "attn2")] == "output_blocks.11.1.transformer_blocks.0.attn2"
    # and the blocks ComfyUI actually reports while sampling: every MoA layer is reached once per call
    seen = []
    model = sd15.model.clone()
    model.set_model_attn1_patch(
        lambda n, c, v, eo: (seen.append((tuple(eo["block"]), eo["block_index"], "attn1")), (n, c, v))[1]
    )
    model.set_model_attn2_patch(
        lambda n, c, v, eo: (seen.append((tuple(eo["block"]), eo["block_index"], "attn2")), (n, c, v))[1]
    )
    with torch.inference_mode():
        model.model.apply_model(
            torch.zeros(1, 4, 8, 8),
            torch.tensor([1.0]),
            c_crossattn=torch.zeros(1, 77, 768),
            transformer_options=model.model_options["transformer_options"],
        )
    assert sorted(seen) == sorted(locations)


def test_subject_words_find_their_tokens(moa_nodes, sd15):
    """The binding over CLIP's real tokenizer (the parsing itself: tests/core/test_subjects.py)."""
    from mixture_core.subjects import find_subject_tokens, parse_subject_words

    vocab, _, key = moa_nodes.sd1_vocabulary(sd15.clip)

    def positions(text, words):
        return find_subject_tokens(vocab, sd15.clip.tokenize(text)[key], parse_subject_words(words))

    # <start> a man and a woman ... : "man" is token 2, "woman" token 5 (not the "man" inside it)
    assert positions(PROMPT, "man, woman") == [2, 5]
    assert positions(PROMPT, "woman, man") == [5, 2]
    assert positions("a person talks to a person", "person#2, person#1") == [6, 2]
    assert positions("superman and a man", "man") == [4]  # whole words only
    assert positions("a man, smiling", "man") == [2]  # punctuation is its own token
    # a word CLIP splits into several tokens binds its last token
    ids = vocab.word_ids("dancerxyz")
    assert len(ids) > 1
    assert positions("a dancerxyz in Paris", "dancerxyz") == [1 + len(ids)]
    assert positions("A MAN walks", "man") == [2]  # CLIP lower-cases


def test_personal_context_fuses_the_marked_rows_only(moa_patch, sd15, moa_one, caplog):
    """The rows whose conditioning uuid the sampling wrapper listed get the fused subject
    tokens, in any chunk order and with batch > 1; every other row (uncond, another prompt)
    keeps its plain context, whatever its values; outside a sampler nothing is fused."""
    model, positive = moa_one
    patch = moa_patch_of(model, moa_patch)
    cond = positive[0][0]
    uncond = encode(sd15.clip, "")[0][0]
    marked = {patch.rows_key: frozenset({(0, "moa")})}  # (cond list, uuid) of the marked entry
    # three chunks of batch 2: uncond, the MoA prompt, another entry carrying the same values
    context = torch.cat([uncond, uncond, cond, cond, cond, cond])
    extra = {"uuids": ["neg", "moa", "other"], "cond_or_uncond": [1, 0, 0], "sigmas": torch.tensor([3.0]), **marked}
    with torch.inference_mode():
        fused = patch.personal_context(context, extra, layer_index=1)
    assert torch.equal(fused[:2], context[:2]) and torch.equal(fused[4:], context[4:])
    token = patch.settings.bindings[0].token_index
    assert token == 2
    rows = fused[2:4] - context[2:4]
    assert rows[:, token].abs().amax() > 1e-3  # the subject token is fused
    rows[:, token] = 0
    assert torch.equal(rows, torch.zeros_like(rows))  # every other token is untouched
    # cfg 1 (one chunk), batch 1
    one_chunk = {"uuids": ["moa"], "cond_or_uncond": [0], **marked}
    with torch.inference_mode():
        one = patch.personal_context(cond, {**one_chunk, "sigmas": torch.tensor([3.0])}, layer_index=1)
    torch.testing.assert_close(one, fused[2:3])
    # the timestep and the layer enter the fusion
    with torch.inference_mode():
        later = patch.personal_context(cond, {**one_chunk, "sigmas": torch.tensor([0.5])}, layer_index=1)
        deeper = patch.personal_context(cond, {**one_chunk, "sigmas": torch.tensor([3.0])}, layer_index=9)
    assert not torch.allclose(later, one) and not torch.allclose(deeper, one)
    # called outside a sampler (no wrapper, no uuids): no fusion, one warning
    with caplog.at_level(logging.WARNING):
        with torch.inference_mode():
            for _ in range(3):
                outside = {"cond_or_uncond": [0], "sigmas": torch.tensor([3.0])}
                plain = patch.personal_context(cond, outside, layer_index=1)
    assert torch.equal(plain, cond)
    assert sum("outside a sampler" in r.message for r in caplog.records) == 1


# ---- sampling ----------------------------------------------------------------------------------


def test_one_subject_samples_and_gives_clip_text_encode_conditioning(sd15, moa_one, moa_one_latent, base_latent):
    model, positive = moa_one
    reference = encode(sd15.clip, PROMPT)
    assert torch.equal(positive[0][0], reference[0][0])
    assert torch.equal(positive[0][1]["pooled_output"], reference[0][1]["pooled_output"])
    assert len(model.get_additional_models_with_key("moa")) == 1
    assert all(mark_of(e) is not None for e in positive)  # marked for the patch
    assert torch.isfinite(moa_one_latent).all()
    assert not torch.allclose(moa_one_latent, base_latent, atol=1e-3)


def test_the_subject_image_matters(moa_nodes, sd15, moa, clip_l14, negative, moa_one_latent):
    """Seed, prompt and everything else fixed: another subject image, another latent."""
    model, positive = inject(moa_nodes, sd15, moa, clip_l14, image(3))
    out = sample(model, positive, negative)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, moa_one_latent, atol=1e-4)


def test_each_subject_photo_is_encoded_once_per_clip_vision(moa_nodes, sd15, moa, clip_l14, clip_h14):
    """Injects over the same photo reuse its embedding; another photo, a photo changed in place
    or another CLIP vision model is encoded anew, and the embeddings are the encoder's own."""
    cache = moa_nodes.SUBJECT_EMBEDDINGS
    photo, other = image(21), image(22)
    start = cache.encoded
    first = moa_nodes.encode_subject_images(clip_l14, [("image_1", photo), ("image_2", other)])
    assert cache.encoded == start + 2
    again = moa_nodes.encode_subject_images(clip_l14, [("image_1", other), ("image_2", photo)])
    assert cache.encoded == start + 2 and torch.equal(again, first.flip(0))
    with torch.no_grad():
        direct = clip_l14.encode_image(moa_nodes.square_subject(photo, clip_l14.image_size)).image_embeds.float()
    assert torch.equal(first[0], direct[0])
    changed = photo.clone()
    changed[0, 0, 0, 0] += 0.5
    moa_nodes.encode_subject_images(clip_l14, [("image_1", changed)])
    assert cache.encoded == start + 3
    moa_nodes.encode_subject_images(clip_h14, [("image_1", photo)])
    assert cache.encoded == start + 4


def test_two_subjects(moa_nodes, sd15, moa, clip_l14, moa_two, negative, base_latent, moa_one_latent):
    """Each image binds to its own word: the same pairing listed in the other order samples the
    same latent, the images swapped between the words another one."""
    model, positive = moa_two
    out = sample(model, positive, negative)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, base_latent, atol=1e-3) and not torch.allclose(out, moa_one_latent, atol=1e-4)
    images = [image(2), image(1)]
    reordered = inject(moa_nodes, sd15, moa, clip_l14, images, words="woman, man", subject_weights="0.8, 1.0")
    torch.testing.assert_close(sample(*reordered, negative), out, rtol=1e-4, atol=1e-5)
    swapped = inject(moa_nodes, sd15, moa, clip_l14, images, words="man, woman", subject_weights="1.0, 0.8")
    assert not torch.allclose(sample(*swapped, negative), out, atol=1e-4)


def test_strength_zero_is_the_unpatched_model(moa_nodes, sd15, moa, clip_l14, negative, base_latent, base_state):
    model, positive = inject(moa_nodes, sd15, moa, clip_l14, image(1), strength=0.0)
    assert patch_counts(model) == base_state  # an unpatched clone
    assert torch.equal(sample(model, positive, negative), base_latent)


def test_outside_start_end_only_the_prior_runs(moa_nodes, sd15, moa, clip_l14, negative, base_latent):
    """One step at the first sigma, MoA active from 50%: bit-identical to the unpatched model
    (the list patches alone change nothing)."""
    model, positive = inject(moa_nodes, sd15, moa, clip_l14, image(1), start_percent=0.5, end_percent=1.0)
    assert torch.equal(sample(model, positive, negative), base_latent)


def test_cfg1_batch2_non_square(moa_one, negative):
    """cfg 1 (cond rows only), a batch of 2, 96x64 px: MoA mixes in every attention."""
    model = moa_one[0].clone()
    prior, mixed = {"attn1": [], "attn2": []}, {"attn1": [], "attn2": []}
    patches = model.model_options["transformer_options"]["patches"]
    for attn in ("attn1", "attn2"):
        patches[f"{attn}_output_patch"].insert(0, spy(prior[attn]))  # sees the prior's output
        patches[f"{attn}_output_patch"].append(spy(mixed[attn]))  # sees MoA's
    out = sample(model, moa_one[1], negative, cfg=1.0, batch=2, width=96, height=64)
    assert out.shape == (2, 4, 8, 12) and torch.isfinite(out).all()
    for attn in ("attn1", "attn2"):
        assert len(prior[attn]) == len(mixed[attn]) == 16
        assert all(a.shape[0] == 2 and not torch.allclose(a, b, atol=1e-4) for a, b in zip(prior[attn], mixed[attn]))


def test_with_controlnet(moa_one, negative, moa_one_latent):
    import comfy.controlnet

    import nodes

    control = comfy.controlnet.load_controlnet(str(rm.sd15_thin_controlnet()))
    model, positive = moa_one
    with torch.inference_mode():
        pos_cn, neg_cn = nodes.ControlNetApplyAdvanced().apply_controlnet(
            positive, negative, control, image(5), 0.8, 0.0, 1.0
        )
    seen, watched = watch_mixing(model)
    out = sample(watched, pos_cn, neg_cn)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, moa_one_latent, atol=1e-4)  # the ControlNet acts under MoA
    assert_mixes(seen)  # and MoA still mixes with the ControlNet's residuals


def watch_mixing(model):
    """({attn: outputs before MoA's output patch, after it}, a clone of `model` recording them)."""
    seen = {"attn1": ([], []), "attn2": ([], [])}
    watched = model.clone()
    patches = watched.model_options["transformer_options"]["patches"]
    for attn, (before, after) in seen.items():
        patches[f"{attn}_output_patch"].insert(0, spy(before))
        patches[f"{attn}_output_patch"].append(spy(after))
    return seen, watched


def assert_mixes(seen, layers=16):
    """One step, cfg 2: every self- and cross-attention's output changed by MoA's mixing."""
    for attn, (before, after) in seen.items():
        assert len(before) == len(after) == layers, attn
        assert all(not torch.allclose(a, b, atol=1e-4) for a, b in zip(before, after)), attn


@pytest.fixture(scope="module")
def lora_dir(sd15, tmp_path_factory):
    root = tmp_path_factory.mktemp("moa_loras")
    loras, gates = root / "loras", root / "mole"
    loras.mkdir(), gates.mkdir()
    layers = mw.target_layers(sd15.model)
    kohya = mw.kohya_names(sd15.model, "diffusers")
    mw.write_lora(loras / "moa_style.safetensors", layers, kohya, seed=21)
    mw.write_lora(loras / "moa_face.safetensors", layers, kohya, seed=22)
    mw.write_lora(loras / "moa_hand.safetensors", layers, kohya, seed=23)
    mw.write_pack_gates(gates / "moa_test_gates.safetensors", layers)
    with model_folders(loras=loras, mole=gates):
        yield root


def test_with_mole(moa_one, negative, lora_dir, moa_one_latent):
    mole_nodes = importlib.import_module(f"{hostenv.PACK_MODULE}.nodes.mole_nodes")
    experts = mole_nodes.LoadMoLEExperts.execute(
        "moa_face.safetensors", "face", 1.0, "moa_hand.safetensors", "hand", 1.0
    ).result[0]
    model, positive = moa_one
    both = mole_nodes.apply_mole(model, experts, "moa_test_gates.safetensors")
    assert (
        len(both.get_additional_models_with_key("moa")) == 1 and len(both.get_additional_models_with_key("mole")) == 1
    )
    assert len([k for k in both.object_patches if k.endswith(".forward")]) == 192
    seen, watched = watch_mixing(both)
    out = sample(watched, positive, negative)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, moa_one_latent, atol=1e-4)  # MoLE acts under MoA
    assert_mixes(seen)  # and MoA still mixes on top of MoLE's layers


def test_with_lora_loader_and_another_packs_attn2_replace(moa_nodes, sd15, moa, clip_l14, negative, lora_dir):
    """MoA on a model that LoRA Loader patched and on which another pack (as IPAdapter) put
    attn2 replace patches before MoA: the LoRA weight patches survive, the replace patches are
    still called (they are the prior), and MoA's output patch mixes after them."""
    import comfy.ldm.modules.attention as attention
    import comfy.sd
    import comfy.utils

    lora = comfy.utils.load_torch_file(str(lora_dir / "loras" / "moa_style.safetensors"), safe_load=True)
    lora_model, lora_clip = comfy.sd.load_lora_for_models(sd15.model, sd15.clip, lora, 0.7, 0.7)
    calls = {"replace": 0}
    prior_out, mixed_out = [], []

    def replace(q, k, v, extra_options):
        calls["replace"] += 1
        return attention.optimized_attention(q, k, v, extra_options["n_heads"])

    other = lora_model.clone()
    for block in [("input", i) for i in (1, 2, 4, 5, 7, 8)] + [("middle", 0)] + [("output", i) for i in range(3, 12)]:
        other.set_model_attn2_replace(replace, *block)
    other.set_model_attn2_output_patch(spy(prior_out))  # before MoA's
    model, positive = inject(moa_nodes, sd15, moa, clip_l14, image(1), model=other, clip=lora_clip)
    assert len(model.patches) > 0  # the LoRA weight patches survive
    model.set_model_attn2_output_patch(spy(mixed_out))  # after MoA's
    out = sample(model, positive, negative)
    assert torch.isfinite(out).all()
    assert calls["replace"] == 16 and len(prior_out) == len(mixed_out) == 16  # one step, 16 cross-attentions
    assert all(not torch.allclose(a, b, atol=1e-4) for a, b in zip(prior_out, mixed_out))
    assert "attn2" in other.model_options["transformer_options"]["patches_replace"]
    assert (
        len(other.model_options["transformer_options"]["patches"]["attn2_output_patch"]) == 1
    )  # the other clone is untouched


def test_morph_and_timelapse(moa_nodes, moa_patch, sd15, moa, clip_l14, moa_two):
    from mixture_core.moa import morph_embeddings

    # morph: the bound embedding is morph_embeddings(image, morph_image, alpha); moa_two holds
    # the embeddings of image(1) and image(2), each encoded alone as here.
    model, _ = inject(moa_nodes, sd15, moa, clip_l14, image(1), morph_image=image(2), morph=0.25)
    bound = moa_patch_of(model, moa_patch).settings.bindings[0].image_embedding
    a, b = (x.image_embedding for x in moa_patch_of(moa_two[0], moa_patch).settings.bindings)
    torch.testing.assert_close(bound, morph_embeddings(a, b, 0.25))
    assert not torch.allclose(bound, a, atol=1e-3)
    # time lapse: "man" -> "kid"; at 1 the conditioning is the prompt with "kid" in its place
    text = "a man dancing in Paris"
    _, at1 = inject(
        moa_nodes, sd15, moa, clip_l14, image(1), text=text, strength=0.0, timelapse_word="kid", timelapse=1.0
    )
    torch.testing.assert_close(at1[0][0], encode(sd15.clip, "a kid dancing in Paris")[0][0], rtol=1e-5, atol=1e-5)
    # between: the subject's input token embedding is timelapse_tokens(man, kid, alpha)
    from mixture_core.moa import timelapse_tokens
    from mixture_core.subjects import parse_subject_words

    vocab, _, key = moa_nodes.sd1_vocabulary(sd15.clip)
    subject = parse_subject_words("man")[0]
    tokens = moa_nodes.apply_timelapse(sd15.clip, vocab, key, sd15.clip.tokenize(text), subject, 2, "kid", 0.5)
    table = moa_nodes.token_embedding_table(sd15.clip).float()
    (man,), (kid,) = vocab.word_ids("man"), vocab.word_ids("kid")
    torch.testing.assert_close(tokens[key][0][2][0], timelapse_tokens(table[man], table[kid], 0.5))
    assert tokens[key][0][3] == sd15.clip.tokenize(text)[key][0][3]  # the other tokens are the prompt's


# ---- which rows carry the subjects: marks, not values ------------------------------------------


def row_spy(patch, seen):
    """An attn2 input patch after MoA's: at the first cross-attention of each model call,
    keeps (context, the rows the patch takes as carrying its subjects, the personalized
    context it makes of them)."""

    def record(n, context, value, extra_options):
        if tuple(extra_options["block"]) == ("input", 1) and extra_options.get("block_index", 0) == 0:
            rows = patch.subject_rows(extra_options, context.shape[0], context.device)
            rows = torch.zeros(context.shape[0], dtype=torch.bool) if rows is None else rows.cpu()
            seen.append((context.clone(), rows, patch.personal_context(context, extra_options, 1)))
        return n, context, value

    return record


def conditioning_case(name, positive, other):
    """(the positive to sample, the context the MoA rows must hold, how many entries carry
    it) after ComfyUI's conditioning node `name`, `other` being another prompt."""
    import nodes

    cond, plain = positive[0][0], other[0][0]
    if name == "as is":
        return positive, cond, 1
    if name == "combine":
        return nodes.ConditioningCombine().combine(positive, other)[0], cond, 1
    if name == "concat":
        return nodes.ConditioningConcat().concat(positive, other)[0], torch.cat([cond, plain], dim=1), 1
    if name == "set area":
        area = nodes.ConditioningSetArea().append(positive, 64, 64, 0, 0, 1.0)[0]
        return nodes.ConditioningCombine().combine(area, other)[0], cond, 1
    if name == "timestep range":
        ranged = nodes.ConditioningSetTimestepRange().set_range(positive, 0.0, 0.5)[0]
        return nodes.ConditioningCombine().combine(ranged, other)[0], cond, 1
    if name == "average":
        return nodes.ConditioningAverage().addWeighted(positive, other, 0.7)[0], 0.7 * cond + 0.3 * plain, 1
    raise AssertionError(name)


BINDING_CASES = ["as is", "combine", "concat", "set area", "timestep range", "average"]


@pytest.mark.parametrize("name", BINDING_CASES)
def test_marked_rows_after_conditioning_nodes(moa_patch, sd15, moa_one, negative, name):
    """Through each conditioning node (with another prompt beside it), at cfg 2 and batch 2,
    on a 96x64 image (the area is 64x64): exactly the rows of the MoA prompt's entries get the
    fused subject tokens; the other prompt's and the uncond rows stay plain."""
    model, positive = moa_one
    patch = moa_patch_of(model, moa_patch)
    other = encode(sd15.clip, "a red house by the sea")
    case, expected, entries = conditioning_case(name, positive, other)
    seen = []
    spied = model.clone()
    spied.set_model_attn2_patch(row_spy(patch, seen))
    out = sample(spied, case, negative, batch=2, width=96)
    assert torch.isfinite(out).all()
    token = patch.settings.bindings[0].token_index
    marked_rows = 0
    for context, rows, fused in seen:
        for row in range(context.shape[0]):
            is_moa = context.shape[1] == expected.shape[1] and torch.allclose(
                context[row].float(), expected[0].float(), rtol=1e-2, atol=1e-2
            )
            assert bool(rows[row]) == is_moa, (name, row)
            changed = (fused[row] - context[row]).abs().amax(dim=-1) > 0
            assert changed.nonzero().flatten().tolist() == ([token] if is_moa else [])
            marked_rows += int(is_moa)
    assert marked_rows == 2 * entries  # batch 2, each MoA entry evaluated once (one step)


def test_several_samplers_share_one_moa_model(moa_nodes, moa_patch, sd15, moa, clip_l14, moa_one, negative):
    """One patched model, three samplers in a row (the MoA prompt, another prompt, the MoA
    prompt again): each call binds the rows of its own sampler's marked conditioning. A second
    MoA Subject Inject chained on that model: each patch binds its own prompt's rows."""
    model, positive = moa_one
    patch = moa_patch_of(model, moa_patch)
    other = encode(sd15.clip, "a red house by the sea")
    counts = []
    for cond in (positive, other, positive):
        seen = []
        spied = model.clone()
        spied.set_model_attn2_patch(row_spy(patch, seen))
        sample(spied, cond, negative)
        counts.append([int(rows.sum()) for _, rows, _ in seen])
    assert counts == [[1], [0], [1]]

    chained, second = inject(moa_nodes, sd15, moa, clip_l14, image(2), words="woman", model=model)
    first_patch, second_patch = moa_patch.find_moa_patches(chained)
    assert first_patch is patch
    import nodes

    seen_first, seen_second = [], []
    chained.set_model_attn2_patch(row_spy(first_patch, seen_first))
    chained.set_model_attn2_patch(row_spy(second_patch, seen_second))
    sample(chained, nodes.ConditioningCombine().combine(positive, second)[0], negative)
    (_, rows_first, _), (_, rows_second, _) = seen_first[0], seen_second[0]
    assert int(rows_first.sum()) == int(rows_second.sum()) == 1 and not bool((rows_first & rows_second).any())


def test_batch_of_marked_and_plain_samples(moa_patch, moa_one, negative):
    """cfg 1, batch 3: every row of the MoA prompt is bound, none of them twice."""
    model, positive = moa_one
    patch = moa_patch_of(model, moa_patch)
    seen = []
    spied = model.clone()
    spied.set_model_attn2_patch(row_spy(patch, seen))
    sample(spied, positive, negative, cfg=1.0, batch=3)
    ((context, rows, fused),) = seen
    assert rows.tolist() == [True, True, True]
    torch.testing.assert_close(fused[0], fused[2])  # same prompt, same timestep, same subject: same tokens


# ---- the executor: validation, one patcher per MoA file ------------------------------------------


class _SessionModels:
    """A source node of these tests: the session's SD1.5 model, CLIP, CLIP vision and VAE, as
    their loader nodes would give them (so the executor does not load a second checkpoint)."""

    RETURN_TYPES = ("MODEL", "CLIP", "CLIP_VISION", "VAE")
    FUNCTION = "provide"
    CATEGORY = "tests"
    OUTPUT = None

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def provide(self):
        return self.OUTPUT


@pytest.fixture(scope="module")
def executor(pack, sd15, clip_l14, moa_dir):
    """ComfyUI's PromptExecutor (as workflows/run.py runs it) with this pack's nodes and the
    session's models."""
    import execution

    import nodes

    extension = asyncio.run(pack.comfy_entrypoint())
    for node in asyncio.run(extension.get_node_list()):
        nodes.NODE_CLASS_MAPPINGS.setdefault(node.GET_SCHEMA().node_id, node)
    _SessionModels.OUTPUT = (sd15.model, sd15.clip, clip_l14, sd15.vae)
    nodes.NODE_CLASS_MAPPINGS["MoLEMoATests_SessionModels"] = _SessionModels
    from workflows.run import _Server

    yield execution.PromptExecutor(_Server(), cache_args={"lru": 0, "ram": 0})
    del nodes.NODE_CLASS_MAPPINGS["MoLEMoATests_SessionModels"]
    _SessionModels.OUTPUT = None


def moa_prompt(text="a man dancing", seed=0, steps=1, moa_name="moa_sd15.safetensors", clip_vision=True, **inject):
    """An API-format prompt: MoA Subject Inject -> KSampler (64x64, cfg 2) -> preview, on the session
    models (node "1"). clip_vision=False leaves Subject Inject's encoder input unwired."""
    inputs = dict(
        model=["1", 0],
        moa=["2", 0],
        clip=["1", 1],
        **({"clip_vision": ["1", 2]} if clip_vision else {}),
        text=text,
        subject_words="man",
        image_1=["3", 0],
        subject_weights="1.0",
        strength=1.0,
        start_percent=0.0,
        end_percent=1.0,
    )
    inputs.update(inject)
    return {
        "1": {"class_type": "MoLEMoATests_SessionModels", "inputs": {}},
        "2": {"class_type": "MoA_LoadRouter", "inputs": {"moa_name": moa_name}},
        "3": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0x808080}},
        "4": {"class_type": "MoA_SubjectInject", "inputs": inputs},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["4", 0],
                "seed": seed,
                "steps": steps,
                "cfg": 2.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "positive": ["4", 1],
                "negative": ["5", 0],
                "latent_image": ["6", 0],
                "denoise": 1.0,
            },
        },
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 3]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }


def validate(prompt):
    import execution

    valid, _, _, node_errors = asyncio.run(execution.validate_prompt("test", prompt, None))
    return valid, node_errors


INVALID = [
    (dict(subject_words="man,,woman"), "an entry is empty"),
    (dict(subject_words="man#0"), "count from 1"),
    (dict(subject_words="dog"), "'dog' is not a word of the prompt"),
    (dict(subject_weights="1, x"), "numbers separated by commas"),
    (dict(subject_weights="1, 1"), "2 weights for 1 subjects"),
    (dict(strength=1.5), "strength must be in [0, 1]"),
    (dict(timelapse=0.5), "timelapse_word is empty"),
]


def test_bad_words_and_weights_mark_the_node_before_the_queue_runs(executor):
    """validate_inputs: ComfyUI's prompt validation marks MoA Subject Inject with the message,
    before any node runs; a good prompt validates."""
    assert validate(moa_prompt()) == (True, {})
    for inject, part in INVALID:
        valid, node_errors = validate(moa_prompt(**inject))
        assert not valid and list(node_errors) == ["4"], inject
        details = " ".join(e["details"] for e in node_errors["4"]["errors"])
        assert part in details, (inject, details)


def test_ten_prompts_one_moa_patcher_no_leak_warning(executor, moa_patch, caplog):
    """Ten MoA prompts through the executor, the subject's prompt changing each time (so MoA
    Subject Inject runs every time while Load MoA Router's output stays cached): every
    patched model hands ComfyUI the loaded file's one patcher, no memory-leak warning is
    logged, and what model management holds stays the same from the second prompt on."""
    import gc

    import comfy.model_management as mm
    import comfy.model_patcher

    def held():
        gc.collect()
        moa_handles = [
            o
            for o in gc.get_objects()
            if isinstance(o, comfy.model_patcher.ModelPatcher) and type(o.model).__name__ == "MoAModel"
        ]
        return len(mm.current_loaded_models), len(moa_handles)

    sizes = []
    with caplog.at_level(logging.INFO):
        for i in range(10):
            prompt = moa_prompt(text=f"a man dancing, take {i}", seed=i)
            executor.execute(prompt, f"moa-{i}", {}, ["9"])
            assert executor.success, executor.status_messages[-1]
            if i in (1, 9):
                sizes.append(held())
    leaks = [r.message for r in caplog.records if "memory leak" in r.message]
    assert leaks == []
    assert sizes[0] == sizes[1], sizes
    loaded = executor.caches.outputs.get("2").outputs[0][0]  # the cached LoadedMoA
    patched = executor.caches.outputs.get("4").outputs[0][0]
    handed = patched.get_additional_models_with_key("moa")
    assert [p.parent if p.parent is not None else p for p in handed] == [loaded.patcher]


# ---- bad input: a clear message, nothing applied ------------------------------------------------


def _bad(moa_nodes, sd15, moa, clip_vision, images, **kw):
    model = sd15.model.clone()
    before = patch_counts(model)
    with pytest.raises(ValueError) as info:
        inject(moa_nodes, sd15, moa, clip_vision, images, model=model, **kw)
    assert patch_counts(model) == before
    return str(info.value)


def test_bad_moa_files(moa_nodes, sd15, clip_l14, moa_dir):
    with torch.inference_mode():
        sdxl = moa_nodes.LoadMoARouter.execute("moa_sdxl_family.safetensors").result[0]
        wide = moa_nodes.LoadMoARouter.execute("moa_wrong_width.safetensors").result[0]
    msg = _bad(moa_nodes, sd15, sdxl, clip_l14, image(1))
    assert "moa_sdxl_family.safetensors" in msg and "'sdxl'" in msg and "'sd15'" in msg, msg
    msg = _bad(moa_nodes, sd15, wide, clip_l14, image(1))
    assert (
        "moa_wrong_width.safetensors" in msg
        and "does not fit this model's attention layers" in msg
        and "context 1024" in msg
    ), msg
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        moa_nodes.LoadMoARouter.execute("missing.safetensors")


def test_clip_vision_must_be_vit_l14(moa_nodes, sd15, moa, clip_h14):
    msg = _bad(moa_nodes, sd15, moa, clip_h14, image(1))
    assert (
        msg.startswith("clip_vision:") and "ViT-L/14" in msg and "hidden size 1280" in msg and "projection 1024" in msg
    ), msg
    msg = _bad(moa_nodes, sd15, moa, object(), image(1))
    assert msg.startswith("clip_vision:"), msg


BAD_WORDS = [
    # (id, kwargs, message parts)
    ("missing word", dict(words="dog"), ["'dog' is not a word of the prompt"]),
    ("ambiguous word", dict(text="a man talks to a man", words="man"), ["'man' occurs 2 times", "man#1"]),
    ("occurrence out of range", dict(text="a man talks to a man", words="man#3"), ["occurrence 3", "2 time(s)"]),
    ("beyond 77 tokens", dict(text="a " * 80 + "man", words="man"), ["beyond the prompt's first 77 tokens"]),
    ("empty words", dict(words=" "), ["subject_words is empty"]),
    ("same word twice", dict(text="a man and a woman", words="man, man#1"), ["same word of the prompt"]),
    ("weights count", dict(subject_weights="1, 1, 1"), ["3 weights for 1 subjects"]),
    ("negative weight", dict(subject_weights="-1"), ["finite and >= 0"]),
    ("strength range", dict(strength=1.5), ["strength must be in [0, 1]"]),
    ("start after end", dict(start_percent=0.8, end_percent=0.2), ["start_percent"]),
    ("morph without image", dict(morph=0.5), ["no morph_image is connected"]),
    ("timelapse without word", dict(timelapse=0.5), ["timelapse_word is empty"]),
    (
        "timelapse word of two tokens",
        dict(timelapse=0.5, timelapse_word="kidxyzq"),
        ["timelapse_word 'kidxyzq'", "single-token"],
    ),
    ("edit subject", dict(edit_subject=2), ["edit_subject 2"]),
]


@pytest.mark.parametrize("kw,parts", [c[1:] for c in BAD_WORDS], ids=[c[0] for c in BAD_WORDS])
def test_bad_words_and_settings(moa_nodes, sd15, moa, clip_l14, kw, parts):
    subjects = max(1, len(kw.get("words", "man").split(",")))
    msg = _bad(moa_nodes, sd15, moa, clip_l14, [image(i) for i in range(subjects)], **kw)
    for part in parts:
        assert part in msg, msg


def test_image_counts(moa_nodes, sd15, moa, clip_l14):
    msg = _bad(moa_nodes, sd15, moa, clip_l14, [image(1), image(2)], words="man")
    assert "2 image(s) (image_1: 1, image_2: 1) for 1 subject word(s) (man)" in msg, msg
    msg = _bad(moa_nodes, sd15, moa, clip_l14, image(1), words="man, woman")
    assert "1 image(s)" in msg and "2 subject word(s) (man, woman)" in msg, msg
    msg = _bad(moa_nodes, sd15, moa, clip_l14, torch.zeros(0, 64, 64, 3))
    assert "image_1 is empty" in msg, msg
    msg = _bad(moa_nodes, sd15, moa, clip_l14, [image(1), torch.zeros(0, 64, 64, 3)], words="man, woman")
    assert "image_2 is empty" in msg, msg
    msg = _bad(moa_nodes, sd15, moa, clip_l14, image(1), morph_image=torch.zeros(0, 64, 64, 3), morph=0.5)
    assert "morph_image is empty" in msg, msg


# ---- last: the input model was never changed ------------------------------------------------------


def test_input_model_is_unchanged(sd15, negative, base_latent, base_state):
    assert patch_counts(sd15.model) == base_state
    assert sd15.model.object_patches == {} and sd15.model.get_additional_models() == []
    assert torch.equal(sample(sd15.model, encode(sd15.clip, PROMPT), negative), base_latent)


def test_ddim_swap_one_and_two_persons(moa_nodes, sd15, moa, clip_l14, negative):
    """MoA DDIM Swap on a small photo: inversion with the prior, regeneration with MoA; the
    progress bar advances once per step over both passes."""
    import comfy.utils

    ddim = importlib.import_module(f"{hostenv.PACK_MODULE}.nodes.ddim_nodes")
    photo, steps = image(5), 2
    seen = []
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(
        lambda value, total, preview, prompt_id=None, node_id=None: seen.append((value, total))
    )
    try:
        one_model, one_positive = inject(moa_nodes, sd15, moa, clip_l14, image(1), words="person", text="a person")
        with torch.inference_mode():
            swapped, latent = ddim.MoADDIMSwap.execute(
                sd15.model, one_model, one_positive, negative, sd15.vae, photo, steps, 1.0, 1.0
            ).result
        assert seen == [(i, 2 * steps) for i in range(1, 2 * steps + 1)]
        assert swapped.shape == photo.shape and torch.isfinite(swapped).all()

        prior_only, _ = inject(moa_nodes, sd15, moa, clip_l14, image(1), words="person", text="a person", strength=0.0)
        with torch.inference_mode():
            _, prior_latent = ddim.MoADDIMSwap.execute(
                sd15.model, prior_only, one_positive, negative, sd15.vae, photo, steps, 1.0, 1.0
            ).result
        assert not torch.allclose(latent["samples"], prior_latent["samples"], atol=1e-4)  # the subject went in

        keep = image(6)  # stands for the crop of the person to keep
        two_model, two_positive = inject(
            moa_nodes,
            sd15,
            moa,
            clip_l14,
            [keep, image(2)],
            words="person#1, person#2",
            text="a person and a person",
            subject_weights="1.0, 1.0",
        )
        with torch.inference_mode():
            swapped_two, _ = ddim.MoADDIMSwap.execute(
                sd15.model, two_model, two_positive, negative, sd15.vae, photo, steps, 1.0, 1.0
            ).result
        assert swapped_two.shape == photo.shape and torch.isfinite(swapped_two).all()
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
