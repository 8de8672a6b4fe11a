"""MoA from FastComposer's weights: its fusion against FastComposer's own code, the training-free
attention router, constant routers, file format version 2 and the image encoder fingerprint."""

import json

import pytest
import torch

# FastComposer's code, ported line by line
from helpers.fastcomposer_weights import FastComposerPostfuseModule, randomize  # noqa: E402

from mixture_core.errors import WeightFileError
from mixture_core.moa import (
    AttentionShape,
    FastComposerFusion,
    MoALayer,
    MoAModel,
    RouterConfig,
    SubjectBinding,
    bind_subjects,
)
from mixture_core.moa_files import load_moa_file, save_moa_file, vision_encoder_fingerprint
from mixture_core.moa_router import SubjectMaps, personal_share, resize_share
from mixture_core.subject_images import square_subject


def test_fastcomposer_fusion_reproduces_its_postfuse_module():
    """Random weights (LayerNorm affine too), SD1.5's 768 widths, two subjects in a 77-token prompt
    (FastComposer's image_token_mask marks the noun before each <|image|>)."""
    torch.manual_seed(0)
    reference = randomize(FastComposerPostfuseModule(768), seed=1)
    ours = FastComposerFusion(768, 768, 768)
    ours.load_state_dict(reference.state_dict())  # the same parameter names: FastComposer's weights load as they are
    text = torch.randn(1, 77, 768)
    objects = torch.randn(1, 2, 1, 768)  # image_encoder output: (b, num_objects, 1, dim)
    mask = torch.zeros(1, 77, dtype=torch.bool)
    mask[0, [3, 7]] = True
    with torch.no_grad():
        expected = reference(text.clone(), objects, mask, torch.tensor([2]))
        bindings = [SubjectBinding(3, objects[0, 0, 0]), SubjectBinding(7, objects[0, 1, 0])]
        got = bind_subjects(text, bindings, ours, torch.tensor(500.0), layer_index=0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[0, 3], text[0, 3])
    assert torch.equal(got[0, [0, 1, 2, 4, 5, 6, 8]], text[0, [0, 1, 2, 4, 5, 6, 8]])
    # No timestep or layer input: the same token at every step and layer.
    assert torch.equal(bind_subjects(text, bindings, ours, torch.tensor(10.0), 5), got)
    # float16 compute with float32 weights (the weights are cast per call)
    half = bind_subjects(text.half(), bindings, ours, torch.tensor(500.0), 0)
    torch.testing.assert_close(half.float(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("size", [(37, 52), (52, 37), (41, 41), (30, 45)])
def test_subject_image_is_prepared_as_fastcomposer_prepares_it(size):
    """Against FastComposer's get_test_object_transforms (transforms.py l. 27-53 PadToSquare and
    l. 275-292) run with torchvision on the uint8 image it reads."""
    T = pytest.importorskip("torchvision.transforms")

    class PadToSquare(torch.nn.Module):  # transforms.py l. 27-53
        def forward(self, image):
            _, h, w = image.shape
            if h == w:
                return image
            elif h > w:
                padding = (h - w) // 2
                image = torch.nn.functional.pad(image, (padding, padding, 0, 0), "constant", 0)
            else:
                padding = (w - h) // 2
                image = torch.nn.functional.pad(image, (0, 0, padding, padding), "constant", 0)
            return image

    reference = torch.nn.Sequential(
        PadToSquare(),
        T.Resize((224, 224), interpolation=T.InterpolationMode.BILINEAR, antialias=True),
        T.ConvertImageDtype(torch.float32),
    )
    h, w = size
    pixels = torch.randint(0, 256, (3, h, w), generator=torch.Generator().manual_seed(h * w), dtype=torch.uint8)
    expected = reference(pixels)  # (3, 224, 224) in [0, 1], rounded to uint8 levels by the uint8 resize
    ours = square_subject(pixels.movedim(0, -1)[None].float() / 255)
    assert ours.shape == (1, 224, 224, 3)
    # ComfyUI's clip_preprocess rounds a 224 px image to uint8 levels: compare at that rounding.
    torch.testing.assert_close((ours[0].movedim(-1, 0) * 255).round() / 255, expected, rtol=0, atol=1.01 / 255)


# ---- the attention router --------------------------------------------------------------------


def test_personal_share_is_the_clamped_quantile_ratio():
    maps = torch.zeros(1, 2, 8, 8)
    maps[0, 0, 1:4, 1:4] = torch.linspace(0.1, 0.9, 9).reshape(3, 3)  # subject 1, top left
    maps[0, 1, 5:7, 5:8] = 0.3  # subject 2, bottom right
    share = personal_share(maps, 0.98)
    assert share.shape == (1, 1, 8, 8)
    support = (maps > 0).any(1, keepdim=True)
    assert torch.equal(share[~support], torch.zeros(int((~support).sum())))  # exactly 0 outside the maps
    q = torch.quantile(maps[0, 0].flatten(), 0.98)
    torch.testing.assert_close(share[0, 0, 1:4, 1:4], (maps[0, 0, 1:4, 1:4] / q).clamp(0, 1))
    assert torch.equal(share[0, 0, 5:7, 5:8], torch.ones(2, 3))  # a flat map: its quantile is its value
    assert torch.equal(personal_share(torch.zeros(2, 1, 4, 4), 0.98), torch.zeros(2, 1, 4, 4))
    # Area pooling onto a coarser grid keeps zeros zero; a 9x9 latent's level below is 5x5 (ceil).
    assert torch.equal(resize_share(share, (4, 4))[..., 3:, :2], torch.zeros(1, 1, 1, 2))
    assert resize_share(torch.ones(1, 1, 9, 9), (5, 5)).shape == (1, 1, 5, 5)


def test_subject_maps_serve_the_previous_step():
    maps = SubjectMaps(0.98)
    images = torch.tensor([0])
    maps.step(14.6)
    assert maps.share(images, (4, 4), 1) is None  # no previous step yet
    planted = torch.zeros(1, 1, 4, 4)
    planted[..., :2, :2] = 1.0
    maps.add(planted, images, 1, (8, 8))
    maps.add(planted * 3, images, 1, (8, 8))
    maps.step(14.6)  # the uncond call of the same step: nothing changes
    assert maps.share(images, (4, 4), 1) is None
    maps.step(7.0)
    share = maps.share(torch.tensor([0, 0]), (4, 4), 1)  # cond and uncond rows of image 0
    assert share.shape == (2, 16, 1) and torch.equal(share[0], share[1])
    grid = share[0, :, 0].reshape(4, 4)
    # Bilinear upsampling to the latent spreads the map by less than a map pixel; beyond, exactly 0.
    assert (
        (grid[:2, :2] > 0.5).all()
        and torch.equal(grid[3:], torch.zeros(1, 4))
        and torch.equal(grid[:, 3:], torch.zeros(4, 1))
    )
    assert maps.share(torch.tensor([1]), (4, 4), 2) is None  # another batch layout: no share
    maps.step(3.0)  # nothing recorded at sigma 7: no share at sigma 3
    assert maps.share(images, (4, 4), 1) is None
    maps.step(14.6)  # any new sigma ends the step (a new run gets new SubjectMaps)
    assert maps.sigma == 14.6 and maps.share(images, (4, 4), 1) is None


def planted_layer(inside: torch.Tensor, token: int, dim=16, context_dim=12, heads=2, logit=200.0):
    """A cross-attention whose subject-token attention is planted: pixel features carry +1
    (inside) or -1 (outside) in channel 0, to_q reads it, the subject token's key points along
    it with a logit of +-`logit` and every other token has key 0 (logit 0). Outside the region
    the subject's probability underflows to exactly 0 in float32; inside it is ~1."""
    layer = MoALayer(AttentionShape(dim, context_dim, heads, 4), router_hidden=0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for lin in (layer.to_v, layer.to_out):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.3)
        layer.to_out.bias.zero_()
        layer.to_q.weight.zero_()
        layer.to_q.weight[:, 0] = 1.0  # every head's query = the pixel's sign
        layer.to_k.weight.zero_()
        layer.to_k.weight[:, 0] = logit / 4  # key of a token with channel 0 set; d_head 4: scale 1/2
    h = torch.randn(1, inside.numel(), dim, generator=g)
    h[0, :, 0] = torch.where(inside.flatten(), 1.0, -1.0)
    context = torch.randn(1, 5, context_dim, generator=g)
    context[..., 0] = 0.0
    context[0, token, 0] = 2.0
    return layer, h, context


def test_attention_router_follows_a_planted_map_and_is_the_prior_elsewhere():
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[2:5, 3:7] = True
    layer, h, context = planted_layer(inside, token=2)
    probs = layer.subject_attention(h, context, [2])  # (1, 64, 1)
    assert torch.equal(probs[0, ~inside.flatten(), 0], torch.zeros(int((~inside).sum())))
    assert (probs[0, inside.flatten(), 0] > 0.99).all()

    maps = SubjectMaps(0.98)
    images = torch.tensor([0])
    maps.step(10.0)
    maps.add(probs.transpose(1, 2).unflatten(-1, (8, 8)), images, 1, (8, 8))
    maps.step(5.0)
    share = maps.share(images, (8, 8), 1)
    torch.testing.assert_close(share[0, :, 0], inside.flatten().float(), rtol=0, atol=1e-2)

    prior = torch.randn(1, 64, 16)
    out = layer(h, prior, context, strength=0.7, share=share)
    outside = ~inside.flatten()
    assert torch.equal(out[0, outside], prior[0, outside])  # bit-identical to the prior outside the map
    personal = layer.personal(h, context)
    torch.testing.assert_close(out[0, ~outside], (prior + 0.7 * share * (personal - prior))[0, ~outside])
    assert not torch.allclose(out[0, ~outside], prior[0, ~outside])
    assert layer(h, prior, context, strength=0.0, share=share) is prior  # strength 0: the prior itself
    with pytest.raises(ValueError, match="no learned router"):
        layer(h, prior, context)


# ---- files ---------------------------------------------------------------------------------

SELF = "input_blocks.1.1.transformer_blocks.0.attn1"
CROSS = "input_blocks.1.1.transformer_blocks.0.attn2"
SHAPES = {SELF: AttentionShape(16, 16, 2, 4), CROSS: AttentionShape(16, 12, 2, 4)}


def small(router, fusion="fastcomposer"):
    model = MoAModel(
        SHAPES,
        router_hidden=8,
        fusion_hidden=12,
        spacetime_dim=6,
        text_dim=12,
        image_dim=12,
        fusion=fusion,
        router=router,
        image_preprocess="fastcomposer",
    )
    return randomize(model, seed=4)


@pytest.mark.parametrize(
    "router",
    [
        RouterConfig("attention", quantile=0.9, prior_steps=0.25, map_layers=(CROSS,)),
        RouterConfig("constant", share=0.4),
    ],
    ids=["attention", "constant"],
)
def test_version_2_round_trip(tmp_path, router):
    model = small(router)
    path = tmp_path / "fc.safetensors"
    save_moa_file(path, model, "sd15", {"moa.image_encoder_fingerprint": "0123456789abcdef"})
    loaded = load_moa_file(path)
    assert loaded.metadata["moa.format_version"] == "2" and loaded.router_config == router
    assert loaded.fusion_kind == "fastcomposer" and loaded.image_preprocess == "fastcomposer"
    assert all(layer.router is None for layer in loaded.layers) and loaded.spacetime is None
    assert loaded.metadata["moa.image_encoder_fingerprint"] == "0123456789abcdef"
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    # A learned router with MoA's own fusion still writes version 1 (older packs read it).
    v1 = tmp_path / "v1.safetensors"
    save_moa_file(v1, MoAModel(SHAPES, 8, 16, 6, 12, 12), "sd15")
    assert load_moa_file(v1).metadata["moa.format_version"] == "1"


@pytest.mark.parametrize(
    "key,value,problem",
    [
        ("moa.router", "oracle", "router kind 'oracle'"),
        (
            "moa.router_map_layers",
            json.dumps(["output_blocks.99.1.transformer_blocks.0.attn2"]),
            "names layers that moa.layers",
        ),
        ("moa.router_quantile", "1.5", "quantile must be in"),
        ("moa.fusion", "ipadapter", "moa.fusion 'ipadapter'"),
        ("moa.image_preprocess", "sharpen", "moa.image_preprocess 'sharpen'"),
    ],
)
def test_bad_version_2_metadata(tmp_path, key, value, problem):
    from safetensors.torch import load_file, save_file

    from mixture_core.safetensors_io import SafetensorsFile

    good = tmp_path / "good.safetensors"
    save_moa_file(good, small(RouterConfig("attention", map_layers=(CROSS,))), "sd15")
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(good)), str(bad), {**SafetensorsFile(good).metadata, key: value})
    with pytest.raises(WeightFileError, match="^bad.safetensors: ") as err:
        load_moa_file(bad)
    assert err.match(problem)


def test_vision_encoder_fingerprint():
    g = torch.Generator().manual_seed(0)
    sd = {f"vision_model.encoder.layers.{i}.mlp.fc1.weight": torch.randn(4, 3, generator=g) for i in range(4)}
    sd |= {f"vision_model.encoder.layers.{i}.layer_norm1.bias": torch.randn(3, generator=g) for i in range(4)}
    sd |= {
        "visual_projection.weight": torch.randn(2, 3, generator=g),
        "vision_model.post_layernorm.weight": torch.randn(3),
    }
    fp = vision_encoder_fingerprint(sd, [2, 3])
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert vision_encoder_fingerprint({k: v.half() for k, v in sd.items()}, (3, 2)) == fp  # fp16 copy, any order
    changed = dict(
        sd,
        **{
            "vision_model.encoder.layers.1.mlp.fc1.weight": torch.zeros(4, 3),
            "vision_model.post_layernorm.weight": torch.zeros(3),
        },
    )
    assert vision_encoder_fingerprint(changed, [2, 3]) == fp  # layers outside the list do not count
    for key in ("vision_model.encoder.layers.3.layer_norm1.bias", "visual_projection.weight"):
        assert vision_encoder_fingerprint(dict(sd, **{key: sd[key] + 0.01}), [2, 3]) != fp
    with pytest.raises(ValueError, match=r"no vision_model.encoder.layers.7.\*"):
        vision_encoder_fingerprint(sd, [3, 7])


def test_constant_share_mixes_every_pixel_alike():
    layer = randomize(MoALayer(AttentionShape(16, 12, 2, 4), router_hidden=0), seed=5)
    h, prior, context = torch.randn(2, 6, 16), torch.randn(2, 6, 16), torch.randn(2, 5, 12)
    personal = layer.personal(h, context)
    torch.testing.assert_close(layer(h, prior, context, strength=0.5, share=0.4), prior + 0.2 * (personal - prior))
    assert torch.equal(layer(h, prior, context, strength=1.0, share=0.0), prior)


# ---- the converter's layout and refusals (meta tensors: no memory, no host) ----------------------


def meta_state_dict():
    """FastComposer's published keys the converter reads, as meta tensors of their shapes, plus an
    unused key of each ignored part and the position_ids buffer of older transformers."""
    from training import convert_fastcomposer as cf

    state = {k: torch.empty(s, dtype=torch.float16, device="meta") for k, s in cf.expected_shapes().items()}
    state |= {
        "unet.conv_in.weight": torch.empty(320, 4, 3, 3, device="meta"),
        "text_encoder.final_layer_norm.weight": torch.empty(768, device="meta"),
        "vae.post_quant_conv.weight": torch.empty(4, 4, 1, 1, device="meta"),
        "image_encoder.vision_model.embeddings.position_ids": torch.arange(257)[None],
    }
    return state


def test_converter_layout_is_fastcomposers_and_transformers():
    """The keys the converter reads: the postfuse module's are FastComposer's module's (the
    ported code), the image encoder's are transformers' CLIPVisionModelWithProjection (ViT-L/14,
    the layout of FastComposer's CLIPModel.vision_model + visual_projection)."""
    from training import convert_fastcomposer as cf

    shapes = cf.expected_shapes()
    postfuse = {f"postfuse_module.{k}": tuple(v.shape) for k, v in FastComposerPostfuseModule(768).state_dict().items()}
    assert postfuse == {k: v for k, v in shapes.items() if k.startswith("postfuse_module.")}
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        patch_size=14,
        image_size=224,
        projection_dim=768,
    )
    with torch.device("meta"):
        vision = transformers.CLIPVisionModelWithProjection(config)
    expected = {
        f"image_encoder.{k}": tuple(v.shape) for k, v in vision.state_dict().items() if not k.endswith("position_ids")
    }
    assert expected == {k: v for k, v in shapes.items() if k.startswith("image_encoder.")}
    moa, converted_vision = cf.convert(meta_state_dict())
    assert (
        len(moa.layer_ids) == 32 and len(moa.router_config.map_layers) == 11 and len(converted_vision) == len(expected)
    )
    assert (
        cf.attention_layers()["output_blocks.11.1.transformer_blocks.0.attn2"][0]
        == "up_blocks.3.attentions.2.transformer_blocks.0.attn2"
    )


def test_converter_refuses_missing_misshaped_and_unknown_keys():
    from training import convert_fastcomposer as cf

    state = meta_state_dict()
    key = "unet.up_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k.weight"
    with pytest.raises(WeightFileError, match=f"1 key\\(s\\) are missing\n  {key}"):
        cf.convert({k: v for k, v in state.items() if k != key})
    bad = "postfuse_module.mlp1.fc1.weight"
    with pytest.raises(
        WeightFileError, match=f"wrong shape or dtype\n  {bad}: \\(768, 768\\) float16, expected \\(768, 1536\\)"
    ):
        cf.convert(dict(state, **{bad: torch.empty(768, 768, dtype=torch.float16, device="meta")}))
    with pytest.raises(WeightFileError, match="FastComposer's model does not have\n  postfuse_module.extra.weight"):
        cf.convert(dict(state, **{"postfuse_module.extra.weight": torch.zeros(2)}))


def test_converter_reads_state_dicts_only(tmp_path):
    import datetime

    from safetensors.torch import save_file

    from training import convert_fastcomposer as cf

    # Anything beyond tensors and plain containers: torch.load(weights_only=True) refuses to build it.
    torch.save({"postfuse_module.x": datetime.timedelta(days=1)}, tmp_path / "payload.bin")
    with pytest.raises(WeightFileError, match="payload.bin: needs more than tensors .* runs no pickled code"):
        cf.read_state_dict(tmp_path / "payload.bin")
    torch.save([torch.zeros(1)], tmp_path / "nested.bin")
    with pytest.raises(WeightFileError, match="nested.bin: holds a list, not a state dict"):
        cf.read_state_dict(tmp_path / "nested.bin")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(WeightFileError, match="empty_dir: holds no pytorch_model.bin"):
        cf.read_state_dict(tmp_path / "empty_dir")
    small = {"postfuse_module.layer_norm.weight": torch.randn(768), "unet.conv_in.bias": torch.randn(320)}
    torch.save(small, tmp_path / "pytorch_model.bin")
    read = cf.read_state_dict(tmp_path)  # the folder: its pytorch_model.bin
    assert read.keys() == small.keys() and all(torch.equal(read[k], small[k]) for k in small)
    save_file(small, str(tmp_path / "copy.safetensors"))
    read = cf.read_state_dict(tmp_path / "copy.safetensors")
    assert read.keys() == small.keys() and all(torch.equal(read[k], small[k]) for k in small)
