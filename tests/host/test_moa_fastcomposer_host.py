"""MoA from FastComposer's weights through the real host: the converter on a random state dict in
the exact layout of FastComposer's pytorch_model.bin (helpers.fastcomposer_weights), its files
loaded by Load MoA Router and ComfyUI's CLIP vision loader, and its refusals."""

from __future__ import annotations

import importlib

import pytest
import torch

import hostenv
from helpers import fastcomposer_weights as fw
from helpers import random_models as rm
from helpers.fixtures import model_folders

pytestmark = pytest.mark.slow


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
    out, vision = root / "moa" / "fastcomposer.safetensors", root / "clip_vision" / "fastcomposer_image_encoder.safetensors"
    convert_fastcomposer.main([str(fastcomposer[0]), "--out", str(out), "--clip-vision-out", str(vision)])
    with model_folders(moa=root / "moa", clip_vision=root / "clip_vision"):
        yield root, out, vision


def test_converted_files_load_and_hold_fastcomposers_weights(moa_nodes, sd15, fastcomposer, converted):
    import comfy.utils
    import nodes

    from mixture_core.moa import SubjectBinding, bind_subjects
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
    assert not any(x.startswith(("input_blocks.1.", "input_blocks.2.", "output_blocks.9.", "output_blocks.10.",
                                 "output_blocks.11.")) for x in router.map_layers)  # diffusers down_blocks.0, up_blocks.3

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
        expected = postfuse(text.clone(), image.expand(2, 1, 1, 768), mask, torch.tensor([1, 1]))
        got = bind_subjects(text, [SubjectBinding(4, image)], moa.fusion.float(), torch.tensor(500.0), 0)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)

    # The clip_vision file is FastComposer's image encoder; the MoA file names it and its fingerprint.
    vision_sd = clip_vision.model.state_dict()
    for k, v in state.items():
        if k.startswith("image_encoder.") and not k.endswith("position_ids"):
            assert torch.equal(vision_sd[k[len("image_encoder."):]].cpu(), v), k
    meta = moa.metadata
    assert meta["moa.image_encoder_file"] == "fastcomposer_image_encoder.safetensors" and meta["moa.image_encoder_layers"] == "22,23"
    assert meta["moa.image_encoder_fingerprint"] == vision_encoder_fingerprint(vision_sd, [22, 23])


def test_converter_refuses_what_is_not_fastcomposers_state_dict(fastcomposer, tmp_path):
    from mixture_core.errors import WeightFileError
    from safetensors.torch import save_file
    from training import convert_fastcomposer as cf

    _, state, _ = fastcomposer
    key = "unet.up_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k.weight"
    with pytest.raises(WeightFileError, match=f"1 key\\(s\\) are missing\n  {key}"):
        cf.convert({k: v for k, v in state.items() if k != key})
    bad = "postfuse_module.mlp1.fc1.weight"
    with pytest.raises(WeightFileError, match=f"wrong shape or dtype\n  {bad}: \\(768, 768\\) float32, expected \\(768, 1536\\)"):
        cf.convert(dict(state, **{bad: torch.zeros(768, 768)}))
    with pytest.raises(WeightFileError, match="FastComposer's model does not have\n  postfuse_module.extra.weight"):
        cf.convert(dict(state, **{"postfuse_module.extra.weight": torch.zeros(2)}))

    class Payload:  # anything beyond tensors and containers: weights_only refuses to build it
        pass

    pickled = tmp_path / "payload.bin"
    torch.save({"postfuse_module.x": Payload()}, pickled)
    with pytest.raises(WeightFileError, match="payload.bin: needs more than tensors .* runs no pickled code"):
        cf.read_state_dict(pickled)
    nested = tmp_path / "nested.bin"
    torch.save([torch.zeros(1)], nested)
    with pytest.raises(WeightFileError, match="nested.bin: holds a list, not a state dict"):
        cf.read_state_dict(nested)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(WeightFileError, match="empty_dir: holds no pytorch_model.bin"):
        cf.read_state_dict(empty)
    copy = tmp_path / "model.safetensors"
    small = {k: state[k] for k in list(state)[:4]}
    save_file(small, str(copy))
    read = cf.read_state_dict(tmp_path / "model.safetensors")
    assert read.keys() == small.keys() and all(torch.equal(read[k], small[k]) for k in small)
