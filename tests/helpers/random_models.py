"""Random-weight model files with the real key layouts, made by code and cached between runs.

Host tests need models that ComfyUI's own loaders detect and load exactly as they would a
downloaded checkpoint, without any download. Every file here is built from ComfyUI's own model
classes (so the key names and shapes are the host's), filled with seeded random values scaled to
keep activations finite, written in the original single-file layout, and cached:

    $MOLE_MOA_TEST_CACHE, else ~/.cache/comfyui-mole-moa-tests

A file is written once, to a temporary name then os.replace()d, under a lock, so an interrupted
or concurrent run never leaves or reads a half file. Each file name carries a recipe version:
change a recipe, bump its version, and a new file is made (old ones can simply be deleted).

Public functions (all need the ComfyUI host and import it through hostenv):

    sd15_checkpoint() -> Path         SD1.5 checkpoint: UNet + CLIP-L + VAE, fp16, ~2.1 GB
    sd15_thin_checkpoint() -> Path    the same with every layer of SD1.5's UNet at width 320, ~0.6 GB
    sd15_small_checkpoint() -> Path   the same with a shallow SD1.5-family UNet (2 levels), ~0.4 GB
    sd15_controlnet() -> Path         SD1.5 ControlNet, control_model.* layout, fp16, ~0.7 GB
    sd15_thin_controlnet() -> Path    the same for the thin UNet of sd15_thin_checkpoint()
    sd15_small_controlnet() -> Path   the same for the shallow UNet of sd15_small_checkpoint()
    clip_vision_vit_l14() -> Path     CLIP ViT-L/14 vision tower + visual_projection, fp16
    clip_vision_vit_h14() -> Path     CLIP ViT-H/14 vision tower (a wrong encoder for SD1.5 tests)
    sdxl_model() -> SDXLBundle        an SDXL-layout UNet ModelPatcher built in-process (no file; full
                                      or, unet_config=SDXL_THIN_UNET_CONFIG, at width 320),
                                      with random positive/negative SDXL conditioning
    sdxl_conditioning(...)            random SDXL conditioning in ComfyUI's format
    cache_dir() -> Path
    import_host() -> Path             hostenv.import_host() (the host, on the CPU when there is no GPU)

Nothing here stands in for ComfyUI: the loaders, model classes and samplers are the host's.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from pathlib import Path

import torch

_TESTS = Path(__file__).resolve().parents[1]
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))
import hostenv  # noqa: E402

# Bump a version when its recipe (architecture, init, dtype, extra keys) changes.
SD15_VERSION = "v1"
SD15_THIN_VERSION = "v1"
SD15_SMALL_VERSION = "v1"
SD15_CONTROLNET_VERSION = "v1"
CLIP_VISION_VERSION = "v1"

SEED_SD15 = 1501
SEED_SD15_CONTROLNET = 1502
SEED_CLIP_VISION_L14 = 1401
SEED_CLIP_VISION_H14 = 1402
SEED_SDXL = 2001

# The UNet configurations ComfyUI itself uses for these families (the converted form of the
# tables in comfy.model_detection.unet_config_from_diffusers_unet); a test checks that the
# host's detect_unet_config() finds exactly the family from the weights made with them.
SD15_UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 2, 4, 4],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": False,
    "context_dim": 768,
    "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
# SD1.5's UNet with every level at width 320 (channel_mult 1 throughout): the same 686 key names,
# 16 transformer blocks and 32 attention layers as SD1.5, which ComfyUI detects and loads as SD15,
# with 111M parameters against 860M. For every test of what hangs on SD1.5's layers (their names,
# their count, which of them MoA or MoLE patch) but not on their widths: a UNet call costs ~8x
# less, and the process holds 0.4 GB of UNet instead of 3.4 GB (fp32 on the CPU), which leaves the
# page cache the model files.
SD15_THIN_UNET_CONFIG = {**SD15_UNET_CONFIG, "channel_mult": [1, 1, 1, 1]}
# A shallow UNet that ComfyUI still detects and loads as SD1.5 (its SD15 entry matches on width
# 320, text width 768 and the attention kind only): two levels of one block each, at width 320
# (~30M parameters against 860M). For the tests of what does not depend on SD1.5's depth
# (inversion, training loops, resume and launch), where the full UNet costs minutes of CPU.
SD15_SMALL_UNET_CONFIG = {
    **SD15_UNET_CONFIG,
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 1],
    "transformer_depth": [1, 1],
    "transformer_depth_output": [1, 1, 1, 1],
}
SDXL_UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "num_classes": "sequential",
    "adm_in_channels": 2816,
    "in_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [2, 2, 2],
    "transformer_depth": [0, 0, 2, 2, 10, 10],
    "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10,
    "use_linear_in_transformer": True,
    "context_dim": 2048,
    "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
# SDXL's UNet with every level at width 320, as SD15_THIN_UNET_CONFIG is to SD1.5: SDXL's 743
# linear layers under their own names (MoLE's 722 targets), detected as SDXL, 283M parameters
# against 2.567B (0.6 GB in fp16 instead of 5.1 GB). What the `sdxl` test fixture builds.
SDXL_THIN_UNET_CONFIG = {**SDXL_UNET_CONFIG, "channel_mult": [1, 1, 1]}
# The SD1.x VAE (ComfyUI's default AutoencoderKL configuration in comfy.sd.VAE).
SD_VAE_DDCONFIG = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "dropout": 0.0,
}


# --------------------------------------------------------------------------------------------
# host and cache


def import_host() -> Path:
    """The ComfyUI host, imported as hostenv.import_host() does (on the CPU where there is no
    CUDA, as `main.py --cpu` would)."""
    return hostenv.import_host()


def cache_dir() -> Path:
    """Where the random model files live ($MOLE_MOA_TEST_CACHE, else ~/.cache/comfyui-mole-moa-tests)."""
    env = os.environ.get("MOLE_MOA_TEST_CACHE")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "comfyui-mole-moa-tests"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cached(name: str, make) -> Path:
    """The cached file `name`, made by make() -> (state dict, metadata) when missing."""
    path = cache_dir() / name
    if path.is_file():
        return path
    from filelock import FileLock

    # An exclusive lock next to the file, so that concurrent runs make it once.
    with FileLock(str(path.with_name(path.name + ".lock"))):
        if path.is_file():  # made by a concurrent run while we waited
            return path
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # nobody else is writing it: left by killed runs
            stale.unlink(missing_ok=True)
        import_host()
        import comfy.utils

        sd, metadata = make()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            comfy.utils.save_torch_file(sd, str(tmp), metadata=metadata)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
    return path


def _metadata(recipe: str, version: str, seed: int) -> dict:
    return {
        "mole_moa_test_model": recipe,
        "mole_moa_test_recipe_version": version,
        "mole_moa_test_seed": str(seed),
        "description": "random weights for tests, not a trained model",
    }


# --------------------------------------------------------------------------------------------
# seeded random initialisation

_POOL_SIZE = 1 << 24  # larger than any single tensor of these models (SDXL's largest: 13.1M)


class _RandomFill:
    """Seeded, fast normal initialisation.

    torch's CPU generator makes ~75M normals/s here, which would be most of the time spent on a
    2.6B-parameter UNet. Instead one pool of 16.7M seeded normals is drawn once, and each tensor is
    copied from it at a seeded random offset (in chunks that wrap), then scaled: every value is
    N(0, std), each tensor's values are iid within a chunk, and the result is deterministic for a
    seed. Tensors are visited in state-dict order, so the same seed gives the same weights."""

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)
        pool = torch.randn(_POOL_SIZE, generator=self.gen)
        self.pools = {pool.dtype: pool}

    def normal_(self, tensor: torch.Tensor, std: float) -> None:
        # No temporaries: a full-size temporary costs more in page faults than the fill itself.
        if not math.isfinite(std):
            raise ValueError(f"std {std}")
        flat = tensor.data.view(-1)
        pool = self.pools.get(flat.dtype)
        if pool is None:
            pool = self.pools[flat.dtype] = self.pools[torch.float32].to(flat.dtype)
        n, pos = flat.numel(), 0
        while pos < n:
            off = int(torch.randint(0, _POOL_SIZE, (1,), generator=self.gen))
            k = min(n - pos, _POOL_SIZE - off)
            torch.mul(pool[off : off + k], std, out=flat[pos : pos + k])
            pos += k


_NORMS = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.BatchNorm2d)
_LAYERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


@torch.no_grad()
def _randomize_(module: torch.nn.Module, seed: int, keep: tuple[str, ...] = ()) -> torch.nn.Module:
    """Fill every parameter of `module` in place: norms weight 1 / bias 0; linear and conv weights
    N(0, 1/fan_in) (activations stay of order one through deep stacks); biases N(0, 0.02^2);
    embeddings and any other parameter N(0, 0.02^2). Parameters named in `keep` are left as
    constructed. Every other parameter is written (ComfyUI's ops leave them uninitialised);
    the values are finite by construction (a finite pool times a finite std)."""
    fill = _RandomFill(seed)
    owner = {}
    for mname, sub in module.named_modules():
        for pname, _ in sub.named_parameters(recurse=False):
            owner[f"{mname}.{pname}" if mname else pname] = (sub, pname)
    for name, param in module.named_parameters():
        if name in keep or name.split(".")[-1] in keep:
            continue
        sub, pname = owner[name]
        if isinstance(sub, _NORMS):
            param.fill_(1.0 if pname == "weight" else 0.0)
        elif isinstance(sub, _LAYERS) and pname == "weight":
            fill.normal_(param, 1.0 / math.sqrt(param[0].numel()))
        else:
            fill.normal_(param, 0.02)
    return module


def _contiguous(sd: dict, dtype=None) -> dict:
    out = {}
    for k, v in sd.items():
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v.contiguous()
    return out


# --------------------------------------------------------------------------------------------
# SD1.5 checkpoint


def _ddpm_buffers() -> dict:
    """The DDPM schedule buffers an original SD1.5 checkpoint carries at its top level
    (ldm's register_schedule with linear_start 0.00085, linear_end 0.012, 1000 steps)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas = 1.0 - betas
    ac = torch.cumprod(alphas, dim=0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
    buffers = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - ac).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
    }
    out = {k: v.to(torch.float32) for k, v in buffers.items()}
    out["model_ema.decay"] = torch.tensor(0.9999, dtype=torch.float32)
    out["model_ema.num_updates"] = torch.tensor(0, dtype=torch.int32)
    return out


def _make_sd15(unet_config: dict = SD15_UNET_CONFIG, recipe: str = "sd15_checkpoint", version: str = SD15_VERSION):
    import comfy.ldm.models.autoencoder
    import comfy.ops
    import comfy.sd1_clip
    import comfy.supported_models

    model_config = comfy.supported_models.SD15(unet_config)
    model_config.set_inference_dtype(torch.float16, None)
    model_config.custom_operations = comfy.ops.disable_weight_init
    base = model_config.get_model({}, "", device=torch.device("cpu"))
    _randomize_(base.diffusion_model, SEED_SD15)

    clip = comfy.sd1_clip.SD1ClipModel(device="cpu", dtype=torch.float16)
    _randomize_(clip, SEED_SD15 + 1, keep=("logit_scale",))

    vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=dict(SD_VAE_DDCONFIG), embed_dim=4)
    _randomize_(vae, SEED_SD15 + 2)

    # ComfyUI's own save path (comfy.sd.save_checkpoint -> BaseModel.state_dict_for_saving):
    # model.diffusion_model.*, cond_stage_model.transformer.text_model.*, first_stage_model.*
    sd = base.state_dict_for_saving(clip.state_dict(), vae.state_dict())
    sd = _contiguous(sd, torch.float16)
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77, dtype=torch.int64)[None]
    sd.update(_ddpm_buffers())
    del base, clip, vae
    return sd, _metadata(recipe, version, SEED_SD15)


def sd15_checkpoint() -> Path:
    """A single-file SD1.5 checkpoint (UNet + CLIP-L text encoder + VAE) with random fp16
    weights in the original layout (model.diffusion_model.*, cond_stage_model.transformer.
    text_model.*, first_stage_model.*, plus the DDPM schedule buffers), which
    comfy.sd.load_checkpoint_guess_config loads as "SD15"."""
    return _cached(f"sd15_random_{SD15_VERSION}.safetensors", _make_sd15)


def sd15_thin_checkpoint() -> Path:
    """sd15_checkpoint() with the thin UNet of SD15_THIN_UNET_CONFIG (SD1.5's key names, width 320
    at every level; same CLIP-L and VAE, ~0.6 GB): ComfyUI loads it as "SD15"."""
    return _cached(
        f"sd15_thin_random_{SD15_THIN_VERSION}.safetensors",
        lambda: _make_sd15(SD15_THIN_UNET_CONFIG, "sd15_thin_checkpoint", SD15_THIN_VERSION),
    )


def sd15_small_checkpoint() -> Path:
    """sd15_checkpoint() with the shallow UNet of SD15_SMALL_UNET_CONFIG (same CLIP-L and VAE,
    ~0.4 GB): ComfyUI loads it as "SD15" and training's checks see an SD1.5 file."""
    return _cached(
        f"sd15_small_random_{SD15_SMALL_VERSION}.safetensors",
        lambda: _make_sd15(SD15_SMALL_UNET_CONFIG, "sd15_small_checkpoint", SD15_SMALL_VERSION),
    )


# --------------------------------------------------------------------------------------------
# SD1.5 ControlNet


def _make_sd15_controlnet(unet_config: dict = SD15_UNET_CONFIG, recipe: str = "sd15_controlnet"):
    import comfy.cldm.cldm
    import comfy.ops
    import comfy.supported_models

    config = dict(comfy.supported_models.SD15(unet_config).unet_config)
    config.pop("out_channels")
    net = comfy.cldm.cldm.ControlNet(
        **config,
        hint_channels=3,
        dtype=torch.float16,
        device=torch.device("cpu"),
        operations=comfy.ops.disable_weight_init,
    )
    _randomize_(net, SEED_SD15_CONTROLNET)
    sd = {f"control_model.{k}": v for k, v in net.state_dict().items()}
    sd = _contiguous(sd, torch.float16)
    del net
    return sd, _metadata(recipe, SD15_CONTROLNET_VERSION, SEED_SD15_CONTROLNET)


def sd15_controlnet() -> Path:
    """A random SD1.5 ControlNet in the original control_sd15_* layout (control_model.*:
    time_embed, input_blocks, input_hint_block, zero_convs, middle_block, middle_block_out),
    fp16, 3 hint channels, which comfy.controlnet.load_controlnet loads."""
    return _cached(f"sd15_controlnet_random_{SD15_CONTROLNET_VERSION}.safetensors", _make_sd15_controlnet)


def sd15_thin_controlnet() -> Path:
    """sd15_controlnet() for the thin UNet of sd15_thin_checkpoint() (its residuals fit that UNet)."""
    return _cached(
        f"sd15_thin_controlnet_random_{SD15_CONTROLNET_VERSION}.safetensors",
        lambda: _make_sd15_controlnet(SD15_THIN_UNET_CONFIG, "sd15_thin_controlnet"),
    )


def sd15_small_controlnet() -> Path:
    """sd15_controlnet() for the shallow UNet of sd15_small_checkpoint() (its residuals fit that UNet)."""
    return _cached(
        f"sd15_small_controlnet_random_{SD15_CONTROLNET_VERSION}.safetensors",
        lambda: _make_sd15_controlnet(SD15_SMALL_UNET_CONFIG, "sd15_small_controlnet"),
    )


# --------------------------------------------------------------------------------------------
# CLIP vision


def _make_clip_vision(config_name: str, seed: int, recipe: str):
    import json

    import comfy.clip_model
    import comfy.ops

    host = import_host()
    with open(host / "comfy" / config_name) as f:
        config = json.load(f)
    model = comfy.clip_model.CLIPVisionModelProjection(
        config, torch.float16, torch.device("cpu"), comfy.ops.manual_cast
    )
    _randomize_(model, seed)
    # The openai/clip-vit-*-patch14 (transformers CLIPVisionModelWithProjection) key names:
    # vision_model.embeddings.*, vision_model.pre_layrnorm.*, vision_model.encoder.layers.N.*,
    # vision_model.post_layernorm.*, visual_projection.weight.
    sd = _contiguous(model.state_dict(), torch.float16)
    del model
    return sd, _metadata(recipe, CLIP_VISION_VERSION, seed)


def clip_vision_vit_l14() -> Path:
    """A random CLIP ViT-L/14 (224 px) vision tower with visual_projection (768), fp16, in the
    transformers layout comfy.clip_vision.load detects as clip_vision_config_vitl.json."""
    return _cached(
        f"clip_vision_vit_l14_random_{CLIP_VISION_VERSION}.safetensors",
        lambda: _make_clip_vision("clip_vision_config_vitl.json", SEED_CLIP_VISION_L14, "clip_vision_vit_l14"),
    )


def clip_vision_vit_h14() -> Path:
    """A random CLIP ViT-H/14 (224 px) vision tower with visual_projection (1024), fp16, which
    comfy.clip_vision.load detects as clip_vision_config_h.json: the wrong encoder for
    ViT-L/14-based models, for tests of bad input."""
    return _cached(
        f"clip_vision_vit_h14_random_{CLIP_VISION_VERSION}.safetensors",
        lambda: _make_clip_vision("clip_vision_config_h.json", SEED_CLIP_VISION_H14, "clip_vision_vit_h14"),
    )


# --------------------------------------------------------------------------------------------
# SDXL (in-process)


@dataclasses.dataclass
class SDXLBundle:
    """model: a ComfyUI ModelPatcher of an SDXL-layout UNet (model_base.SDXL, EPS, random
    weights); positive / negative: SDXL conditioning in ComfyUI's format
    ([[cond (1, 77, 2048), {"pooled_output": (1, 1280), "width", "height", ...}]]), ready for
    nodes.common_ksampler / comfy.sample.sample; seconds: time taken to build it."""

    model: object
    positive: list
    negative: list
    seconds: float

    def latent(self, width: int = 64, height: int = 64, batch: int = 1) -> dict:
        """An empty SDXL latent {"samples": (batch, 4, height/8, width/8)} for the samplers."""
        return {"samples": torch.zeros(batch, 4, height // 8, width // 8)}


def sdxl_conditioning(seed: int = SEED_SDXL, width: int = 1024, height: int = 1024, tokens: int = 77) -> list:
    """Random SDXL conditioning in ComfyUI's format, shaped as CLIPTextEncode on an SDXL CLIP
    (CLIP-L 768 + CLIP-G 1280 hidden states, CLIP-G pooled output) would give, without CLIP-G
    weights: [[cond (1, tokens, 2048), {"pooled_output": (1, 1280), size conditioning}]]."""
    gen = torch.Generator().manual_seed(seed)
    cond = torch.randn(1, tokens, 2048, generator=gen)
    pooled = torch.randn(1, 1280, generator=gen)
    return [
        [
            cond,
            {
                "pooled_output": pooled,
                "width": width,
                "height": height,
                "crop_w": 0,
                "crop_h": 0,
                "target_width": width,
                "target_height": height,
            },
        ]
    ]


def build_sdxl_unet(
    weight_dtype: torch.dtype = torch.float16, seed: int = SEED_SDXL, unet_config: dict = SDXL_UNET_CONFIG
):
    """An SDXL model (comfy.model_base.SDXL) built in-process from comfy.supported_models.SDXL
    with random weights stored in `weight_dtype`; on the CPU, fp16/bf16 weights are cast to
    fp32 per layer when run (ComfyUI's manual_cast ops), fp32 weights are used as they are."""
    import_host()
    import comfy.model_management as mm
    import comfy.supported_models

    model_config = comfy.supported_models.SDXL(dict(unet_config))
    load_device = mm.get_torch_device()
    manual_cast = mm.unet_manual_cast(weight_dtype, load_device, model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(weight_dtype, manual_cast)
    base = model_config.get_model({}, "", device=mm.unet_offload_device())
    _randomize_(base.diffusion_model, seed)
    return base


def sdxl_model(
    weight_dtype: torch.dtype = torch.float16, seed: int = SEED_SDXL, unet_config: dict = SDXL_UNET_CONFIG
) -> SDXLBundle:
    """An SDXL-layout UNet in the real host, the fastest way measured: built in-process from
    ComfyUI's SDXL model config (comfy.supported_models.SDXL -> model_base.SDXL, the real layer
    names and widths, 2.567B parameters; SDXL_THIN_UNET_CONFIG: the names at width 320), with no
    file at all.

    Measured on 2 CPU cores (one step = nodes.common_ksampler, 1 step, cfg, 64x64 px):
      in-process fp16 weights (default): ~3.5 s to build, ~6 s a step, peak RSS 6.2 GB
      in-process fp32 weights:           ~9.5 s to build, ~4.5 s a step, peak RSS 11 GB
      in-process bf16 weights:           ~5 s to build, ~36 s a step (bf16 casts are slow here)
      cached 5.1 GB fp16 UNet file + comfy.sd.load_diffusion_model: ~10 s (fp16) or ~22 s (fp32,
      14 GB RSS) to load, plus ~12 s once to write the file
    fp32 weights pay back only after ~4 steps and double the memory.

    Returns an SDXLBundle: .model (ModelPatcher), .positive / .negative (random SDXL
    conditioning, see sdxl_conditioning), .latent(w, h), .seconds (build time)."""
    import_host()
    import comfy.model_management as mm
    import comfy.model_patcher

    start = time.perf_counter()
    base = build_sdxl_unet(weight_dtype, seed, unet_config)
    patcher = comfy.model_patcher.ModelPatcher(
        base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )
    return SDXLBundle(
        model=patcher,
        positive=sdxl_conditioning(seed + 1),
        negative=sdxl_conditioning(seed + 2),
        seconds=time.perf_counter() - start,
    )
