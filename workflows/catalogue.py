"""What the shipped workflows name: model files (with their public downloads), input images, and
the sampling settings of each paper's figures. The graphs (mole_figures.py, moa_figures.py) take
their file names and settings from here only."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

HF = "https://huggingface.co"


class File(NamedTuple):
    """A file a workflow names: its folder (models/<folder>, or input/ for images), its name (the
    loader widget's value: the upstream name where there is a download, so nothing is renamed),
    where it comes from, and its public download URL ("" when only training makes it)."""

    folder: str
    name: str
    where: str
    url: str = ""

    @property
    def model(self) -> dict | None:
        """The frontend's model-file entry ({name, url, directory}: its missing-models dialog), if
        the file has a public download."""
        return {"name": self.name, "url": self.url, "directory": self.folder} if self.url else None


CHECKPOINT = File(
    "checkpoints",
    "v1-5-pruned-emaonly.safetensors",
    "Stable Diffusion 1.5 (the papers' base model; any SD1.5 checkpoint works)",
    f"{HF}/stable-diffusion-v1-5/stable-diffusion-v1-5/resolve/main/v1-5-pruned-emaonly.safetensors",
)
OPENPOSE = File(
    "controlnet",
    "control_v11p_sd15_openpose_fp16.safetensors",
    "ControlNet v1.1 OpenPose for SD1.5 (fp16)",
    f"{HF}/comfyanonymous/ControlNet-v1-1_fp16_safetensors/resolve/main/control_v11p_sd15_openpose_fp16.safetensors",
)
# Any SD1.5 style LoRA works (the MoA paper used ToonYou and Pixar from CivitAI): this one is a
# public SD1.5 style LoRA with a plain download.
STYLE_LORA = File(
    "loras",
    "pastelmix-lora.safetensors",
    "an SD1.5 style LoRA (Pastel Mix; any SD1.5 style LoRA works)",
    f"{HF}/licyk/sd-lora/resolve/main/sd_1.5/style/pastelmix-lora.safetensors",
)
FASTCOMPOSER_PAGE = f"{HF}/mit-han-lab/fastcomposer"
# FastComposer's published weights (MIT license), read by Load MoA Router as they are: its
# fine-tuned image encoder travels with them, so no clip_vision file is needed. The frontend's
# missing-models dialog (1.35) lists a .bin with its URL but refuses to download it ("Only allowed
# suffixes are: '.safetensors', '.sft'"): Copy URL, or the link in the graph's note.
FASTCOMPOSER = File(
    "moa",
    "pytorch_model.bin",
    f"FastComposer's published weights ({FASTCOMPOSER_PAGE}, MIT license), read as they are "
    "(converted once on first load, image encoder included)",
    f"{FASTCOMPOSER_PAGE}/resolve/main/pytorch_model.bin",
)
TRAINED_MOA = "moa_sd15.safetensors"  # the name training/moa_train.py's README suggests

# Only training makes these: no SD1.5 MoLE weights were ever released (training/README.md).
FACE_EXPERT = File(
    "loras",
    "mole_face_sd15.safetensors",
    "MoLE face expert, made with training/mole_expert.py --part face (kohya LoRA); name field `face`",
)
HAND_EXPERT = File(
    "loras",
    "mole_hand_sd15.safetensors",
    "MoLE hand expert, made with training/mole_expert.py --part hand (kohya LoRA); name field `hand`",
)
GATES = File("mole", "mole_gates_sd15.safetensors", "MoLE gates, made with training/mole_gates.py")

# SDXL MoLE: SDXL base 1.0 and the MoLE authors' MoLE-SDXL release. The release's file names are
# the ones the authors' own generation command loads (JiePKU/MoLE
# sd-scripts-xl/gen_command/moe_sdxl_gen-id0-llava.sh); the Hugging Face file list could not be
# read here, so the names (and that they sit at the repository's top level) are the likeliest,
# not confirmed (README, Model files).
MOLE_SDXL = f"{HF}/jiezhueval/MoLE-SDXL"
SDXL_CHECKPOINT = File(
    "checkpoints",
    "sd_xl_base_1.0.safetensors",
    "SDXL base 1.0",
    f"{HF}/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors",
)


def _mole_sdxl(folder: str, name: str, what: str) -> File:
    return File(folder, name, f"the MoLE-SDXL {what} ({MOLE_SDXL})", f"{MOLE_SDXL}/resolve/main/{name}")


SDXL_FACE_EXPERT = _mole_sdxl(
    "loras", "lora_sdxl_face_llavacap_30k-lr2e-5-d256-step00030000.safetensors", "face expert (kohya LoRA, rank 256)"
)
SDXL_HAND_EXPERT = _mole_sdxl(
    "loras", "lora_sdxl_hand_llavacap_60k-lr1e-5-d256-step00060000.safetensors", "hand expert (kohya LoRA, rank 256)"
)
SDXL_GATES = _mole_sdxl(
    "mole", "moe_sdxl_clip25_50K-highquality-llavacap-step00030000.safetensors", "gate file (released MoLE format)"
)
SDXL_NAMES_NOTE = (
    "The MoLE-SDXL names are the ones the authors' own generation command loads "
    "(JiePKU/MoLE `sd-scripts-xl/gen_command/moe_sdxl_gen-id0-llava.sh`); if the release names them "
    "otherwise, pick the files in Load MoLE Experts (face expert in expert_1, name `face`; hand expert in "
    "expert_2, name `hand`) and Apply MoLE Gating (gates)."
)

SUBJECTS = [
    File("input", "subject_1.png", "a photo of subject 1 (a face crop works best)"),
    File("input", "subject_2.png", "a photo of subject 2"),
    File("input", "subject_3.png", "a photo of subject 3"),
]
POSE = File("input", "pose.png", "an OpenPose skeleton image (e.g. from a pose preprocessor)")
PHOTO_ONE = File("input", "photo_one_person.png", "a real photo of one person (sides multiples of 8)")
PHOTO_TWO = File("input", "photo_two_persons.png", "a real photo of two persons (sides multiples of 8)")
KEEP_PERSON = File("input", "keep_person.png", "a crop of the person to keep in the two-person photo")

SEED = 42
NEGATIVE = "lowres, blurry, bad anatomy, bad hands, extra fingers, deformed face"


@dataclass(frozen=True)
class Settings:
    """How a figure's images are sampled, and where that comes from (said in the graph's note)."""

    sampler: str
    scheduler: str
    steps: int
    cfg: float
    size: int
    source: str
    suffix: str = ""  # appended to every positive prompt
    negative_suffix: str = ""  # appended to every negative prompt


# The MoLE authors' generation scripts (SD1.5: sd-scripts-v1.5/gen_img_diffusers_moe.py with
# gen_command/gen_mole.sh; SDXL: sd-scripts-xl/moe_sdxl_gen_img.py with
# gen_command/moe_sdxl_gen-id0-llava.sh): DDIM, 50 steps, guidance scale 7.5, 512x512 (SD1.5) or
# the script's default 1024x1024 (SDXL), and the script appends " best quality, 8K" to every
# prompt and " poor quality, unclear hand, bad face" to every negative prompt.
_MOLE_SOURCE = (
    "the MoLE authors' released generation settings ({script}, {command}): DDIM sampler, "
    '50 steps, cfg 7.5, {size}x{size}, " best quality, 8K" appended to the prompt and " poor quality, '
    "unclear hand, bad face\" to the negative prompt. ComfyUI's `ddim` sampler with the `ddim_uniform` "
    "scheduler stands in for the script's diffusers DDIMScheduler"
)


def _mole_settings(script: str, command: str, size: int) -> Settings:
    source = _MOLE_SOURCE.format(script=script, command=command, size=size)
    return Settings(
        "ddim", "ddim_uniform", 50, 7.5, size, source, " best quality, 8K", " poor quality, unclear hand, bad face"
    )


MOLE_SD15 = _mole_settings("sd-scripts-v1.5/gen_img_diffusers_moe.py", "gen_command/gen_mole.sh", 512)
MOLE_SDXL_SETTINGS = _mole_settings("sd-scripts-xl/moe_sdxl_gen_img.py", "gen_command/moe_sdxl_gen-id0-llava.sh", 1024)
# MoA Sec. 4.1: "During inference, we use the UniPC sampler"; steps and guidance are not given.
MOA_UNIPC = Settings(
    "uni_pc",
    "normal",
    30,
    7.0,
    512,
    "the MoA paper's sampler, UniPC (Sec. 4.1); the paper gives no step count or cfg: 30 steps, cfg 7",
)
# MoA Fig. 13 (real-photo swap): DDIM inversion of the photo, then DDIM regeneration with MoA, as
# the paper's Sec. 5.3 describes; it gives no step count: 50 steps, cfg 1 (exact).
MOA_DDIM = Settings(
    "ddim",
    "ddim_uniform",
    50,
    1.0,
    512,
    "DDIM inversion of the photo, then DDIM regeneration with MoA, as the MoA paper's real-photo swap does; "
    "the paper gives no step count: 50 steps, cfg 1 for both passes (the exact, cheapest inversion)",
)


def pack_identity() -> dict:
    """The node properties ComfyUI-Manager writes on a known pack's nodes (cnr_id: the registry id,
    aux_id: the GitHub owner/repo, ver), from pyproject.toml: a shared graph's missing nodes then
    resolve to this pack ("Install missing custom nodes")."""
    import tomllib  # Python 3.11+: only the build reads it

    with open(Path(__file__).resolve().parents[1] / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    repository = project["urls"]["Repository"].rstrip("/").removesuffix(".git")
    return {"cnr_id": project["name"], "aux_id": "/".join(repository.split("/")[-2:]), "ver": project["version"]}
