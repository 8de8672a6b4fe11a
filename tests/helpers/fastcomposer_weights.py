"""FastComposer's own code (ported line by line) and a random state dict in the exact layout of its
published pytorch_model.bin, for the converter's tests (training.convert_fastcomposer).

FastComposer: github.com/mit-han-lab/fastcomposer (MIT license), commit b9304a2. Its published
file is ``torch.save(FastComposerModel.state_dict())`` (fastcomposer/inference.py l. 51-55 loads it
with model.load_state_dict), so its keys follow FastComposerModel's modules (model.py l. 418-438):
``text_encoder.*`` (FastComposerTextEncoder: embeddings, encoder, final_layer_norm),
``image_encoder.*`` (FastComposerCLIPImageEncoder: vision_model, visual_projection; its
vision_processor is a Normalize without weights), ``vae.*``, ``unet.*`` (diffusers
UNet2DConditionModel) and ``postfuse_module.*`` (FastComposerPostfuseModule).

    FCMLP, fuse_object_embeddings, FastComposerPostfuseModule   model.py, as written there
    randomize(module, seed)                                     random weights, LayerNorm gains near 1
    fastcomposer_state_dict(model_patcher, clip_vision_path)    (state dict, postfuse module): see there
"""

from __future__ import annotations

import torch
import torch.nn as nn

# ---- fastcomposer/model.py, ported line by line (only torch is needed, so it runs as written there)


class FCMLP(nn.Module):  # model.py lines 23-42 (class MLP)
    def __init__(self, in_dim, out_dim, hidden_dim, use_residual=True):
        super().__init__()
        if use_residual:
            assert in_dim == out_dim
        self.layernorm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.use_residual = use_residual
        self.act_fn = nn.GELU()

    def forward(self, x):
        residual = x
        x = self.layernorm(x)
        x = self.fc1(x)
        x = self.act_fn(x)
        x = self.fc2(x)
        if self.use_residual:
            x = x + residual
        return x


def fuse_object_embeddings(
    inputs_embeds, image_token_mask, object_embeds, num_objects, fuse_fn=torch.add
):  # lines 128-160
    object_embeds = object_embeds.to(inputs_embeds.dtype)

    batch_size, max_num_objects = object_embeds.shape[:2]
    seq_length = inputs_embeds.shape[1]
    flat_object_embeds = object_embeds.view(-1, object_embeds.shape[-2], object_embeds.shape[-1])

    valid_object_mask = torch.arange(max_num_objects, device=flat_object_embeds.device)[None, :] < num_objects[:, None]

    valid_object_embeds = flat_object_embeds[valid_object_mask.flatten()]

    inputs_embeds = inputs_embeds.view(-1, inputs_embeds.shape[-1])
    image_token_mask = image_token_mask.view(-1)
    valid_object_embeds = valid_object_embeds.view(-1, valid_object_embeds.shape[-1])

    # slice out the image token embeddings
    image_token_embeds = inputs_embeds[image_token_mask]
    valid_object_embeds = fuse_fn(image_token_embeds, valid_object_embeds)

    inputs_embeds.masked_scatter_(image_token_mask[:, None], valid_object_embeds)
    inputs_embeds = inputs_embeds.view(batch_size, seq_length, -1)
    return inputs_embeds


class FastComposerPostfuseModule(nn.Module):  # lines 163-188
    def __init__(self, embed_dim):
        super().__init__()
        self.mlp1 = FCMLP(embed_dim * 2, embed_dim, embed_dim, use_residual=False)
        self.mlp2 = FCMLP(embed_dim, embed_dim, embed_dim, use_residual=True)
        self.layer_norm = nn.LayerNorm(embed_dim)

    def fuse_fn(self, text_embeds, object_embeds):
        text_object_embeds = torch.cat([text_embeds, object_embeds], dim=-1)
        text_object_embeds = self.mlp1(text_object_embeds) + text_embeds
        text_object_embeds = self.mlp2(text_object_embeds)
        text_object_embeds = self.layer_norm(text_object_embeds)
        return text_object_embeds

    def forward(self, text_embeds, object_embeds, image_token_mask, num_objects):
        text_object_embeds = fuse_object_embeddings(
            text_embeds, image_token_mask, object_embeds, num_objects, self.fuse_fn
        )
        return text_object_embeds


def randomize(module, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():  # LayerNorm gains around 1, everything else around 0
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale + (1.0 if "norm.weight" in name else 0.0))
    return module


# ---- a random published file ------------------------------------------------------------------

# Tensors of diffusers' transformer blocks the converter does not use (FastComposer fine-tuned
# them too): kept in the random file so that the test sees them ignored.
_UNUSED_BLOCK_PARTS = ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "norm3.weight", "norm3.bias")


def fastcomposer_state_dict(model_patcher, clip_vision_path, seed: int = 0, noise: float = 0.3):
    """A random state dict in the layout and shapes of FastComposer's pytorch_model.bin, and the
    FastComposerPostfuseModule its postfuse_module.* came from. Built from the structure, not
    from the converter's tables:

    * unet.*: every attention's to_q/to_k/to_v/to_out.0 (and its block's norms, unused) under the
      diffusers names ComfyUI's own comfy.utils.unet_to_diffusers gives for the model's config,
      valued as the host model's weights (the prior) plus noise (so the personalized branch
      differs from the prior), and conv_in (unused). The rest of the UNet is left out (the
      converter reads only attention projections; its other keys are ignored by prefix).
    * image_encoder.*: the random CLIP ViT-L/14 file's tensors (transformers layout) and the
      position_ids buffer older transformers versions (FastComposer's 4.25.1) saved with them.
    * postfuse_module.*: FastComposerPostfuseModule(768), randomized.
    * text_encoder.final_layer_norm.* and vae.post_quant_conv.* (unused parts).
    """
    import comfy.utils
    from safetensors.torch import load_file

    gen = torch.Generator().manual_seed(seed)
    unet = model_patcher.model.diffusion_model
    sai = unet.state_dict()
    mapping = comfy.utils.unet_to_diffusers(model_patcher.model.model_config.unet_config)
    parts = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "to_out.0.bias")
    state = {}
    for diffusers, sai_key in mapping.items():
        if ".transformer_blocks." not in diffusers:
            continue
        tail = diffusers.split(".transformer_blocks.", 1)[1].split(".", 1)[1]  # "attn1.to_q.weight", "norm1.weight"
        t = sai[sai_key].detach().float()
        if tail.split(".", 1)[1] in parts:
            t = t + torch.randn(t.shape, generator=gen) * t.std() * noise
        elif tail not in _UNUSED_BLOCK_PARTS:
            continue
        state[f"unet.{diffusers}"] = t.half()
    state["unet.conv_in.weight"] = sai["input_blocks.0.0.weight"].half()
    for k, v in load_file(str(clip_vision_path)).items():
        state[f"image_encoder.{k}"] = v
    state["image_encoder.vision_model.embeddings.position_ids"] = torch.arange(257)[None]
    postfuse = randomize(FastComposerPostfuseModule(768), seed + 1, scale=0.05)
    state |= {f"postfuse_module.{k}": v.detach().clone() for k, v in postfuse.state_dict().items()}
    state |= {
        "text_encoder.final_layer_norm.weight": torch.ones(768),
        "text_encoder.final_layer_norm.bias": torch.zeros(768),
        "vae.post_quant_conv.weight": torch.randn(4, 4, 1, 1, generator=gen),
    }
    return state, postfuse
