"""Stage 1 (training.mole_finetune) through the real host: the checkpoint it writes is loaded by
ComfyUI's checkpoint loader and samples; only the trained UNet tensors change; the loss falls."""

from __future__ import annotations

import gc
import re

import pytest
import torch
from safetensors import safe_open
from training_helpers import ksample, make_dataset, read_log, run_training, tiny_args

pytestmark = [pytest.mark.host, pytest.mark.slow]

# On the shallow SD1.5-family checkpoint (`small_checkpoint`): what stage 1 writes and trains does
# not depend on the UNet's depth. Its last output block and the output conv exercise the
# trainable-subset path (a full UNet with AdamW/Lion state is a GPU job).
TRAINABLE = r"^(out|output_blocks\.3)\."


def test_finetuned_checkpoint_loads_in_comfyui_and_learned(tmp_path, small_checkpoint, sd15_small):
    checkpoint, sd15 = small_checkpoint, sd15_small
    import comfy.sd

    data = make_dataset(tmp_path / "one", n=1)
    out = tmp_path / "stage1.safetensors"
    run_training(
        "mole_finetune",
        "--trainable",
        TRAINABLE,
        "--optimizer",
        "lion",
        "--min-snr-gamma",
        "5",
        "--lr",
        "1e-4",
        "--fixed-noise",
        *tiny_args(checkpoint, data, out, 6),
    )

    losses = [r["loss"] for r in read_log(str(out.with_suffix("")) + "-work")]
    assert len(losses) == 6 and sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2, losses

    with safe_open(str(checkpoint), "pt") as src, safe_open(str(out), "pt") as new:
        assert set(src.keys()) == set(new.keys())
        assert new.metadata()["mole.stage"] == "finetune" and new.metadata()["mole.trained_steps"] == "6"
        changed, unchanged_trainable = [], []
        for key in src.keys():
            same = torch.equal(src.get_tensor(key), new.get_tensor(key))
            unet_name = key[len("model.diffusion_model.") :] if key.startswith("model.diffusion_model.") else None
            if unet_name is not None and re.search(TRAINABLE, unet_name):
                if same:
                    unchanged_trainable.append(key)
            elif not same:
                changed.append(key)
        assert changed == []  # frozen UNet tensors, text encoder, VAE, schedule buffers: bit-identical
        assert unchanged_trainable == []

    model, _, _, _ = comfy.sd.load_checkpoint_guess_config(
        str(out), output_vae=False, output_clip=False, embedding_directory=None
    )
    try:
        assert type(model.model.model_config).__name__ == "SD15"
        sample = ksample(sd15, model)
        assert torch.isfinite(sample).all() and not torch.equal(sample, ksample(sd15, sd15.model))
    finally:
        del model
        gc.collect()


def test_text_encoder_trains_with_the_unet(tmp_path, small_checkpoint, sd15_small):
    """--train-text-encoder: the trainable encoder is the checkpoint's (same conditioning as
    ComfyUI's CLIP), its tensors change in the output, the VAE does not, and ComfyUI loads it."""
    checkpoint, sd15 = small_checkpoint, sd15_small
    import comfy.sd

    from training import base_model, mole_finetune

    base = base_model.Base(
        str(checkpoint), sd15.model, sd15.clip, sd15.vae, sd15.model.model.diffusion_model, "sd15", torch.zeros(1000)
    )
    text_encoder = mole_finetune.trainable_text_encoder(base)
    tokens = sd15.clip.tokenize("a photo of a man waving")
    with torch.no_grad():
        mine = text_encoder(input_ids=torch.tensor([[t for t, _ in tokens["l"][0]]])).last_hidden_state
        theirs = sd15.clip.encode_from_tokens(tokens)
    torch.testing.assert_close(mine, theirs.float(), atol=2e-2, rtol=2e-2)  # ComfyUI runs it in fp16
    assert set(mole_finetune.text_encoder_state_for_saving(text_encoder)) <= set(
        safe_open(str(checkpoint), "pt").keys()
    )

    data = make_dataset(tmp_path / "one", n=1)
    out = tmp_path / "stage1_te.safetensors"
    run_training(
        "mole_finetune",
        "--trainable",
        TRAINABLE,
        "--lr",
        "1e-3",
        "--train-text-encoder",
        *tiny_args(checkpoint, data, out, 2),
    )
    with safe_open(str(checkpoint), "pt") as src, safe_open(str(out), "pt") as new:
        text_keys = [k for k in src.keys() if k.startswith("cond_stage_model.")]
        changed = [k for k in text_keys if not torch.equal(src.get_tensor(k), new.get_tensor(k))]
        assert len(changed) > len(text_keys) // 2
        assert all(
            torch.equal(src.get_tensor(k), new.get_tensor(k)) for k in src.keys() if k.startswith("first_stage_model.")
        )
    _, clip, _, _ = comfy.sd.load_checkpoint_guess_config(
        str(out), output_vae=False, output_clip=True, embedding_directory=None
    )
    trained = clip.encode_from_tokens(clip.tokenize("a photo of a man waving"))
    assert torch.isfinite(trained).all() and not torch.allclose(trained.float(), theirs.float(), atol=1e-3)
    del clip
    gc.collect()
