"""training.moa_train through the real host: one micro training run (a session fixture, shared by
the tests here) learns, leaves the prior alone, trains exactly the image encoder's last layers,
covers the paper's router layers and FastComposer's localization layers, and writes files that
Load MoA Router, Load CLIP Vision and MoA Subject Inject use; its MoA patch survives real
gradient-checkpoint recomputation; wrong inputs stop it before any model loads."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import random_models as rm
from helpers.fixtures import model_folders
from moa_helpers import make_moa_dataset
from training_helpers import read_log, tiny_args

from training import moa_train

STEPS = 6


def moa_args(checkpoint, data, output, steps, *extra):
    return [
        *tiny_args(checkpoint, data, output, steps),
        "--clip-vision",
        str(rm.clip_vision_vit_l14()),
        *map(str, extra),
    ]


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory, checkpoint):
    """One image (nested FastComposer layout) with one person annotated, noise and timestep fixed,
    no drops or augmentation: an overfitting task. One subject image a step: CLIP ViT-L/14 at
    224 px costs seconds per image on one CPU thread, the UNet at 64 px far less."""
    root = tmp_path_factory.mktemp("moa_micro")
    out = root / "moa" / "moa_micro.safetensors"
    result = moa_train.main(
        moa_args(
            checkpoint,
            make_moa_dataset(root / "data", n=1, words=("man",)),
            out,
            STEPS,
            "--lr",
            "1e-3",
            "--fixed-noise",
            "--cond-drop",
            "0",
            "--subject-drop",
            "0",
            "--no-subject-augmentation",
            "--router-loss-weight",
            "1",
            "--localization-loss-weight",
            "1",
        )
    )
    return result, out


def test_micro_task_learns_and_leaves_the_prior_alone(micro_run, checkpoint):
    from safetensors import safe_open

    result, _ = micro_run
    losses = result.losses
    assert len(losses) == STEPS and losses[-1] < 0.8 * losses[0], losses
    assert len(read_log(result.work_dir)) == STEPS
    unet = result.stage.model.unet.state_dict()
    with safe_open(str(checkpoint), framework="pt") as f:
        for key in [k for k in f.keys() if k.startswith("model.diffusion_model.")]:
            mine = unet[key[len("model.diffusion_model.") :]]
            assert torch.equal(mine.to(f.get_tensor(key).dtype), f.get_tensor(key)), key


def test_losses_cover_the_papers_and_fastcomposers_layers(micro_run):
    from safetensors import safe_open

    _, out = micro_run
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    router, localization = json.loads(meta["moa.router_loss_layers"]), json.loads(meta["moa.localization_loss_layers"])
    assert len(json.loads(meta["moa.layers"])) == 32 and len(router) == 22 and len(localization) == 11
    assert not any(
        i.startswith(
            ("input_blocks.1.", "input_blocks.2.", "output_blocks.9.", "output_blocks.10.", "output_blocks.11.")
        )
        for i in router
    )
    assert all(i.endswith("attn2") for i in localization)


def test_image_encoder_last_layers_train_and_the_rest_stay(micro_run):
    """The encoder file beside the MoA file: layers 22 and 23 moved by the optimizer, every other
    tensor equal to the given encoder's; the MoA file names it and its fingerprint."""
    from safetensors.torch import load_file

    from mixture_core.moa_files import vision_encoder_fingerprint

    _, out = micro_run
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    encoder_file = out.parent / meta["moa.image_encoder_file"]
    assert meta["moa.image_encoder_layers"] == "22,23"
    trained, given = load_file(str(encoder_file)), load_file(str(rm.clip_vision_vit_l14()))
    assert set(trained) == set(given)
    assert meta["moa.image_encoder_fingerprint"] == vision_encoder_fingerprint(trained, [22, 23])
    assert meta["moa.image_encoder_fingerprint"] != vision_encoder_fingerprint(given, [22, 23])
    for key in given:
        moved = float((trained[key].float() - given[key].float()).abs().max())
        if key.startswith(("vision_model.encoder.layers.22.", "vision_model.encoder.layers.23.")):
            if key.endswith(("self_attn.q_proj.weight", "mlp.fc2.weight")):
                assert moved > 1e-4, key  # optimizer steps, not weight decay alone (~1e-7 here)
        else:
            assert moved == 0, key


def test_trained_files_load_and_sample_through_the_nodes(micro_run, sd15, pack):
    """Load MoA Router + Load CLIP Vision (the trained encoder file) + MoA Subject Inject + a
    KSampler step. The tall subject photo reaches CLIP padded to a square, its top rows (a red
    head) in: ComfyUI's own center crop would have cut them."""
    import importlib

    import comfy.clip_vision
    from safetensors import safe_open

    import nodes

    _, out = micro_run
    with safe_open(str(out), framework="pt") as f:
        encoder_file = out.parent / f.metadata()["moa.image_encoder_file"]
    moa_nodes = importlib.import_module(f"{pack.__name__}.nodes.moa_nodes")
    clip_vision = comfy.clip_vision.load(str(encoder_file))
    seen, encode = [], clip_vision.encode_image
    clip_vision.encode_image = lambda image, **kw: seen.append(image) or encode(image, **kw)
    photo = torch.full((1, 150, 50, 3), 0.5)
    photo[:, :15, :, :] = torch.tensor([1.0, 0.0, 0.0])  # the head: red top rows
    with model_folders(moa=out.parent), torch.inference_mode():
        loaded = moa_nodes.LoadMoARouter.execute(out.name).result[0]
        assert loaded.model.metadata.get("moa.trained_steps") == str(STEPS)
        model, positive = moa_nodes.MoASubjectInject.execute(
            model=sd15.model,
            moa=loaded,
            clip=sd15.clip,
            clip_vision=clip_vision,
            text="a man waving",
            subject_words="man",
            image_1=photo,
            subject_weights="1.0",
            strength=1.0,
            start_percent=0.0,
            end_percent=1.0,
        ).result
        latent = {"samples": torch.zeros(1, 4, 8, 8)}
        negative = nodes.CLIPTextEncode().encode(sd15.clip, "")[0]
        with_moa = nodes.common_ksampler(model, 7, 1, 2.0, "euler", "normal", positive, negative, latent)[0]["samples"]
        plain = nodes.common_ksampler(sd15.model, 7, 1, 2.0, "euler", "normal", positive, negative, latent)[0][
            "samples"
        ]
    assert torch.isfinite(with_moa).all() and not torch.equal(with_moa, plain)
    (image,) = seen
    assert image.shape[1] == image.shape[2]  # square
    top = image[0, :5, image.shape[2] // 2]
    assert (top[:, 0] > 0.9).all() and (top[:, 1:] < 0.1).all()


def test_moa_patch_survives_gradient_checkpoint_recomputation(micro_run):
    """The whole UNet call under torch.utils.checkpoint (non-reentrant): backward recomputes
    every MoA layer with the batch's subject bindings and yields the same gradients."""
    from torch.utils.checkpoint import checkpoint

    result, _ = micro_run
    model = result.stage.model
    model = getattr(model, "module", model)
    from training import moa_data, moa_samples

    samples = moa_data.scan_moa_dataset(model.args.data)
    bound = moa_samples.MoADataset(
        samples, 64, moa_samples.Draws(max_subjects=1, subject_drop=0, condition_drop=0, augment=False)
    )
    unbound = moa_samples.MoADataset(samples, 64, moa_samples.Draws(condition_drop=1, augment=False))
    batch = moa_samples.collate_list([bound[(0, 0)], unbound[(0, 1)]])  # one subject and none: padded
    params = [p for p in model.parameters() if p.requires_grad]

    def grads():
        for p in params:
            p.grad = None
        model(batch).backward()
        return [p.grad.clone() if p.grad is not None else None for p in params]

    calls = []
    mix = model.patch._mix

    def counting(attn):
        inner = mix(attn)
        return lambda out, extra: calls.append(attn) or inner(out, extra)

    unet = model.unet
    try:
        model.patch._mix = counting
        plain = grads()
        n_plain = len(calls)

        class Checkpointed(torch.nn.Module):
            def forward(self, x, **kwargs):
                return checkpoint(unet, x, use_reentrant=False, **kwargs)

        model.unet = Checkpointed()
        again = grads()
    finally:
        model.unet = unet
        del model.patch._mix
    assert len(calls) == 3 * n_plain  # plain; checkpointed forward; its recomputation
    assert sum(g is not None for g in plain) > 0
    for a, b in zip(plain, again):
        assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, atol=1e-6, rtol=1e-4))


def test_bf16_training_stores_and_moves_what_it_should(tmp_path, checkpoint, monkeypatch):
    """--mixed-precision bf16 (the docstring's example) on the CPU: the frozen UNet and the frozen
    encoder layers are stored in bf16 and stay as given; every trainable tensor (MoA weights, the
    encoder's last layers) is fp32 and moved by the optimizer, not by weight decay alone."""
    from safetensors import safe_open

    from training import loop

    initial, train = {}, loop.train

    def snapshot(args, accelerator, base, stage, samples):
        initial.update({k: v.detach().clone() for k, v in stage.trainable.items()})
        return train(args, accelerator, base, stage, samples)

    monkeypatch.setattr(loop, "train", snapshot)
    out = tmp_path / "moa" / "bf16.safetensors"
    data = make_moa_dataset(tmp_path / "data", n=1, words=("man",))
    flags = ["--mixed-precision", "bf16", "--lr", "1e-3", "--fixed-noise", "--cond-drop", "0", "--subject-drop", "0"]
    flags += ["--no-subject-augmentation", "--router-loss-weight", "1", "--localization-loss-weight", "1"]
    result = moa_train.main(moa_args(checkpoint, data, out, 2, *flags))
    model = result.stage.model
    model = getattr(model, "module", model)

    assert all(torch.isfinite(torch.tensor(result.losses))), result.losses
    with safe_open(str(checkpoint), framework="pt") as f:
        unet = model.unet.state_dict()
        for key in [k for k in f.keys() if k.startswith("model.diffusion_model.")][::7]:
            stored = unet[key[len("model.diffusion_model.") :]]
            assert stored.dtype == torch.bfloat16 and torch.equal(stored, f.get_tensor(key).to(torch.bfloat16)), key
    trained_encoder = ("vision_model.encoder.layers.22.", "vision_model.encoder.layers.23.")
    for name, p in model.image_encoder.named_parameters():
        assert p.requires_grad == name.startswith(trained_encoder), name
    assert set(initial) == set(result.stage.trainable) and len(initial) > 100
    groups = {}
    for name, p in result.stage.trainable.items():
        assert p.dtype == torch.float32, name
        group = name.split(".")[0] + "." + name.rsplit(".", 2)[-2]  # moa.to_q, moa.fc2, image_encoder.q_proj ...
        groups[group] = max(groups.get(group, 0.0), float((p.detach() - initial[name]).abs().max()))
    assert {"moa.to_q", "moa.to_k", "moa.to_v", "moa.to_out", "moa.fc1", "moa.fc2", "image_encoder.q_proj"} <= set(
        groups
    )
    still = {g: d for g, d in groups.items() if d < 1e-4}  # weight decay alone moves ~1e-8 here
    assert not still, still
    with safe_open(str(out), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}  # --save-dtype's default


# ---- early errors ---------------------------------------------------------------------------


def test_wrong_inputs_stop_before_any_model_loads(tmp_path, checkpoint, monkeypatch):
    from safetensors.torch import save_file

    from training import base_model

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(base_model, "load_base", no_loading)
    data = make_moa_dataset(tmp_path / "data", n=1)
    out = tmp_path / "x.safetensors"

    vit_h = tmp_path / "vit_h.safetensors"  # shapes are all the check reads: small stand-in tensors of ViT-H's names
    save_file(
        {
            "vision_model.embeddings.patch_embedding.weight": torch.zeros(1280, 3, 1, 1),
            "vision_model.encoder.layers.31.layer_norm1.weight": torch.zeros(1280),
        },
        str(vit_h),
    )
    args = moa_args(checkpoint, data, out, 1, "--lr", "1e-4")
    with pytest.raises(SystemExit, match=r"--clip-vision .*vit_h.safetensors: MoA encodes subjects with CLIP ViT-L/14"):
        moa_train.main([*args[:-4], "--clip-vision", str(vit_h), "--lr", "1e-4"])

    sdxl = tmp_path / "sdxl.safetensors"
    save_file(
        {
            "conditioner.embedders.1.model.ln_final.weight": torch.zeros(2),
            "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(2, 2048),
        },
        str(sdxl),
    )
    with pytest.raises(SystemExit, match="MoA trains on SD1.5 checkpoints .* this one is SDXL"):
        moa_train.main(moa_args(sdxl, data, out, 1, "--lr", "1e-4"))

    (data / "image_ids_train.txt").write_text("0070000\n0070001\n")
    with pytest.raises(SystemExit, match=r"0070001.jpg: is missing"):
        moa_train.main(args)


# ---- the command line ----------------------------------------------------------------------

CAPTION_PIPELINE = ("--crop", "--flip", "--no-cache", "--cache-dir", "--min-snr-gamma", "--sample-every")


def _help(script: str, capsys) -> str:
    import importlib

    with pytest.raises(SystemExit):
        importlib.import_module(f"training.{script}").parse_args(["--help"])
    return capsys.readouterr().out


def test_moa_train_offers_only_the_options_it_uses(capsys):
    """moa_train reads its own data (no caption cache, crops or flips), its own loss (no Min-SNR)
    and samples nothing; the MoLE scripts keep those options."""
    moa = _help("moa_train", capsys)
    assert not [flag for flag in CAPTION_PIPELINE if flag in moa], moa
    assert "MoA data folder" in moa and "captions" not in moa
    assert "--clip-vision" in moa and "--num-workers" in moa and "--fixed-noise" in moa
    for script in ("mole_finetune", "mole_expert", "mole_gates"):
        mole = _help(script, capsys)
        assert all(flag in mole for flag in CAPTION_PIPELINE), script
        assert ".txt captions" in mole, script
