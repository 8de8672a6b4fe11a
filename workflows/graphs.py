"""The shipped workflows, written once as API-format graphs (class_type + inputs).

`python3 -m workflows.build` turns each into the two shipped files: `workflows/<file>.json`
(the graph editor's format, laid out and given its note by the real ComfyUI frontend) and
`workflows/api/<file>.json` (this graph, as `python3 -m workflows.run` and the /prompt API
take it), <file> being the graph's entry in FILES. The tests check that the two agree and that
every value fits its node.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The model files the workflows name, by folder (models/<folder>, or input/ for images).
CHECKPOINT = ("checkpoints", "v1-5-pruned-emaonly.safetensors")
FACE_EXPERT = ("loras", "mole_face_sd15.safetensors")
HAND_EXPERT = ("loras", "mole_hand_sd15.safetensors")
GATES = ("mole", "mole_gates_sd15.safetensors")
MOA = ("moa", "moa_sd15.safetensors")
CLIP_VISION = ("clip_vision", "clip_vit_large_patch14.safetensors")
OPENPOSE = ("controlnet", "control_v11p_sd15_openpose.safetensors")
STYLE_LORA = ("loras", "style_lora_sd15.safetensors")
SUBJECTS = [("input", f"subject_{i}.png") for i in (1, 2, 3)]
POSE = ("input", "pose.png")
PHOTO_ONE = ("input", "photo_one_person.png")
PHOTO_TWO = ("input", "photo_two_persons.png")
KEEP_PERSON = ("input", "keep_person.png")
# SDXL MoLE: SDXL base 1.0 and the MoLE authors' released MoLE-SDXL files. The names of the files
# in that release are not known here: these are the names the graphs expect (rename the
# downloads, or pick the files in the loader nodes).
SDXL_CHECKPOINT = ("checkpoints", "sd_xl_base_1.0.safetensors")
SDXL_FACE_EXPERT = ("loras", "mole_sdxl_face.safetensors")
SDXL_HAND_EXPERT = ("loras", "mole_sdxl_hand.safetensors")
SDXL_GATES = ("mole", "mole_sdxl_gates.safetensors")
MOLE_SDXL_URL = "https://huggingface.co/jiezhueval/MoLE-SDXL/tree/main"
SDXL_NAMES_NOTE = (
    "The file names inside the MoLE-SDXL release are not known to this pack: the names above are "
    "the ones the graph expects. Rename the downloads to them, or pick the files in Load MoLE Experts "
    "(face expert in expert_1 with name `face`, hand expert in expert_2 with name `hand`) and Apply "
    "MoLE Gating (gates)."
)
FC_MOA = ("moa", "fastcomposer.safetensors")
FC_CLIP_VISION = ("clip_vision", "fastcomposer_image_encoder.safetensors")
FASTCOMPOSER_URL = "https://huggingface.co/mit-han-lab/fastcomposer/resolve/main/pytorch_model.bin"

SEED = 42
NEGATIVE = "lowres, blurry, bad anatomy, bad hands, extra fingers, deformed face"

WHERE = {
    CHECKPOINT: "any SD1.5 checkpoint (the papers' base model is Stable Diffusion 1.5)",
    FACE_EXPERT: "MoLE face expert, made with training/mole_expert.py --part face (kohya LoRA; no SD1.5 MoLE "
    "weights are published); name field `face`",
    HAND_EXPERT: "MoLE hand expert, made with training/mole_expert.py --part hand (kohya LoRA); name field `hand`",
    GATES: "MoLE gates, made with training/mole_gates.py (see training/README.md)",
    MOA: "MoA weights: training/moa_train.py",
    CLIP_VISION: "CLIP ViT-L/14 vision model (openai/clip-vit-large-patch14), as FastComposer",
    OPENPOSE: "ControlNet v1.1 OpenPose for SD1.5",
    STYLE_LORA: "any SD1.5 style LoRA",
    SDXL_CHECKPOINT: "SDXL base 1.0 (https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0)",
    SDXL_FACE_EXPERT: f"the MoLE-SDXL face expert (kohya LoRA, rank 256), {MOLE_SDXL_URL}; name field `face`",
    SDXL_HAND_EXPERT: f"the MoLE-SDXL hand expert (kohya LoRA, rank 256), {MOLE_SDXL_URL}; name field `hand`",
    SDXL_GATES: f"the MoLE-SDXL gate file (released MoLE format, `moe_...softmoe...` keys), {MOLE_SDXL_URL}",
    SUBJECTS[0]: "a photo of subject 1 (a face crop works best)",
    SUBJECTS[1]: "a photo of subject 2",
    SUBJECTS[2]: "a photo of subject 3",
    POSE: "an OpenPose skeleton image (e.g. from a pose preprocessor)",
    PHOTO_ONE: "a real photo of one person (sides multiples of 8)",
    PHOTO_TWO: "a real photo of two persons (sides multiples of 8)",
    KEEP_PERSON: "a crop of the person to keep in the two-person photo",
    FC_MOA: "MoA converted from FastComposer: training/convert_fastcomposer.py (see above)",
    FC_CLIP_VISION: "FastComposer's image encoder: training/convert_fastcomposer.py --clip-vision-out (see above)",
}


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
MOLE_SD15 = Settings(
    "ddim",
    "ddim_uniform",
    50,
    7.5,
    512,
    _MOLE_SOURCE.format(script="sd-scripts-v1.5/gen_img_diffusers_moe.py", command="gen_command/gen_mole.sh", size=512),
    " best quality, 8K",
    " poor quality, unclear hand, bad face",
)
MOLE_SDXL = Settings(
    "ddim",
    "ddim_uniform",
    50,
    7.5,
    1024,
    _MOLE_SOURCE.format(
        script="sd-scripts-xl/moe_sdxl_gen_img.py", command="gen_command/moe_sdxl_gen-id0-llava.sh", size=1024
    ),
    " best quality, 8K",
    " poor quality, unclear hand, bad face",
)
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
# the paper's Sec. "real-image editing" describes; it gives no step count: 50 steps, cfg 1 (exact).
MOA_DDIM = Settings(
    "ddim",
    "ddim_uniform",
    50,
    1.0,
    512,
    "DDIM inversion of the photo, then DDIM regeneration "
    "with MoA, as the MoA paper's real-photo swap does; the paper gives no step count: 50 steps, "
    "cfg 1 for both passes (the exact, cheapest inversion)",
)


@dataclass
class Graph:
    name: str
    title: str
    figure: str
    shows: str
    settings: Settings
    base: str = "SD1.5"
    checkpoint: tuple = CHECKPOINT
    mole_files: tuple = (FACE_EXPERT, HAND_EXPERT, GATES)  # face expert, hand expert, gates
    files_note: str = ""
    nodes: dict = field(default_factory=dict)
    files: list = field(default_factory=list)
    setup: str = ""  # Markdown put in the note before the file list (download and convert steps)

    def add(self, class_type: str, title: str | None = None, **inputs) -> Ref:
        node_id = str(len(self.nodes) + 1)
        node = {"inputs": inputs, "class_type": class_type}
        if title:
            node["_meta"] = {"title": title}
        self.nodes[node_id] = node
        return Ref(node_id)

    def file(self, entry: tuple[str, str]) -> str:
        if entry not in self.files:
            self.files.append(entry)
        return entry[1]

    @property
    def file_stem(self) -> str:
        """The shipped files' name without extension (FILES)."""
        return FILES[self.name]

    def note(self) -> str:
        intro = f"Reproduces {self.figure}. {self.shows}" if self.figure else self.shows
        lines = [
            f"# {self.title}",
            "",
            intro,
            "",
            *([self.setup, ""] if self.setup else []),
            f"Sampling: {self.settings.source}.",
            "",
            "## Files it needs",
            "",
        ]
        for folder, name in self.files:
            where = "ComfyUI/input/" if folder == "input" else f"ComfyUI/models/{folder}/"
            lines.append(f"- `{name}` in `{where}`: {WHERE[(folder, name)]}")
        if self.files_note:
            lines += ["", self.files_note]
        lines += [
            "",
            "Names can be changed in the loader nodes. Run headless: "
            f'`python3 -m workflows.run "workflows/{self.file_stem}.json" --out OUT` from the pack\'s folder.',
        ]
        return "\n".join(lines)


@dataclass(frozen=True)
class Ref:
    node_id: str

    def __getitem__(self, slot: int) -> list:
        return [self.node_id, slot]


# ---- building blocks ----------------------------------------------------------------------


def checkpoint(g: Graph):
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=g.file(g.checkpoint))
    return ckpt[0], ckpt[1], ckpt[2]


def encode(g: Graph, clip, text: str, title: str | None = None):
    """A positive prompt, with the suffix the figure's generation script appends."""
    return g.add("CLIPTextEncode", title, text=text + g.settings.suffix, clip=clip)[0]


def negative(g: Graph, clip):
    return g.add("CLIPTextEncode", "negative", text=NEGATIVE + g.settings.negative_suffix, clip=clip)[0]


def latent(g: Graph, batch=1):
    size = g.settings.size
    return g.add("EmptyLatentImage", width=size, height=size, batch_size=batch)[0]


def sample(g: Graph, model, positive, negative, latent_image, vae, title: str, seed=SEED):
    s = g.settings
    samples = g.add(
        "KSampler",
        title,
        seed=seed,
        steps=s.steps,
        cfg=s.cfg,
        sampler_name=s.sampler,
        scheduler=s.scheduler,
        denoise=1.0,
        model=model,
        positive=positive,
        negative=negative,
        latent_image=latent_image,
    )[0]
    return g.add("VAEDecode", samples=samples, vae=vae)[0]


def side_by_side(g: Graph, images: list):
    """One IMAGE batch of several images (ImageBatch pairs them up)."""
    out = images[0]
    for image in images[1:]:
        out = g.add("ImageBatch", image1=out, image2=image)[0]
    return out


def save(g: Graph, images, prefix: str):
    g.add("SaveImage", f"Save: {prefix}", images=images, filename_prefix=f"{g.name}/{prefix}")


def mole_experts(g: Graph):
    face, hand, _ = g.mole_files
    return g.add(
        "MoLE_LoadExperts",
        expert_1=g.file(face),
        name_1="face",
        strength_1=1.0,
        expert_2=g.file(hand),
        name_2="hand",
        strength_2=1.0,
    )[0]


def mole(g: Graph, model, experts, mode="both", title=None):
    return g.add(
        "MoLE_ApplyGating", title, model=model, experts=experts, gates=g.file(g.mole_files[2]), mode=mode, strength=1.0
    )[0]


def moa_inputs(g: Graph):
    moa = g.add("MoA_LoadRouter", moa_name=g.file(MOA))[0]
    clip_vision = g.add("CLIPVisionLoader", clip_name=g.file(CLIP_VISION))[0]
    return moa, clip_vision


def load_image(g: Graph, entry, title=None):
    return g.add("LoadImage", title, image=g.file(entry))[0]


def inject(g: Graph, model, moa, clip, clip_vision, text, words, images, title=None, **extra):
    # Every widget is written, optional ones included, as the editor's "Export (API)" does.
    widgets = dict(edit_subject=1, morph=0.0, timelapse_word="", timelapse=0.0) | extra
    node = g.add(
        "MoA_SubjectInject",
        title,
        model=model,
        moa=moa,
        clip=clip,
        clip_vision=clip_vision,
        text=text,
        subject_words=words,
        subject_weights="1.0",
        strength=1.0,
        start_percent=0.0,
        end_percent=1.0,
        **{f"image_{i + 1}": image for i, image in enumerate(images)},
        **widgets,
    )
    return node[0], node[1]


# ---- MoLE ---------------------------------------------------------------------------------


def mole_graph(name: str, title: str, figure: str, shows: str, sdxl: bool) -> Graph:
    """A MoLE figure's graph on SD1.5 (weights made with training/) or on SDXL with the released
    MoLE-SDXL files (name + "_sdxl"), at the released generation settings for that base."""
    if sdxl:
        return Graph(
            f"{name}_sdxl",
            f"{title} (SDXL, released weights)",
            figure,
            shows,
            MOLE_SDXL,
            "SDXL",
            SDXL_CHECKPOINT,
            (SDXL_FACE_EXPERT, SDXL_HAND_EXPERT, SDXL_GATES),
            files_note=SDXL_NAMES_NOTE,
        )
    return Graph(name, title, figure, shows, MOLE_SD15)


MOLE_PROMPT = "photo of a young woman waving at the camera, upper body, detailed face and hands"


def mole_fig1_lora_refinement() -> Graph:
    g = mole_graph(
        "mole_fig1_lora_refinement",
        "MoLE Fig. 1: low-rank refinement",
        "MoLE Fig. 1",
        "Each close-up expert applied as a plain LoRA at scales 0, 0.5 and 1, same seed: the face "
        "expert refines faces, the hand expert hands.",
        sdxl=False,
    )
    model, clip, vae = checkpoint(g)
    pos, neg, empty = encode(g, clip, MOLE_PROMPT), negative(g, clip), latent(g)
    base = sample(g, model, pos, neg, empty, vae, "scale 0 (base)")
    for expert, part in ((FACE_EXPERT, "face"), (HAND_EXPERT, "hand")):
        row = [base]
        for scale in (0.5, 1.0):
            lora = g.add(
                "LoraLoaderModelOnly",
                f"{part} expert x{scale}",
                model=model,
                lora_name=g.file(expert),
                strength_model=scale,
            )[0]
            row.append(sample(g, lora, pos, neg, empty, vae, f"{part} x{scale}"))
        save(g, side_by_side(g, row), f"{part}_scales_0_0.5_1")
    return g


def mole_fig8_9_comparison(sdxl: bool = False) -> Graph:
    g = mole_graph(
        "mole_fig8_9_comparison",
        "MoLE Fig. 8 / 9: base model vs MoLE",
        "MoLE Fig. 8 and 9",
        f"Base {'SDXL' if sdxl else 'SD1.5'} and MoLE on the same two seeds (one batch), side by side.",
        sdxl,
    )
    model, clip, vae = checkpoint(g)
    pos = encode(g, clip, "a man playing the guitar on a street, upper body, detailed face and hands")
    neg, empty = negative(g, clip), latent(g, batch=2)
    gated = mole(g, model, mole_experts(g))
    save(g, sample(g, model, pos, neg, empty, vae, f"base {g.base}"), "base")
    save(g, sample(g, gated, pos, neg, empty, vae, "MoLE"), "mole")
    return g


def mole_table3_assignment_ablation(sdxl: bool = False) -> Graph:
    g = mole_graph(
        "mole_table3_assignment_ablation",
        "MoLE Table 3: assignment ablation",
        "MoLE Table 3",
        "Base, local gates only, global gates only and both, on the same seed.",
        sdxl,
    )
    model, clip, vae = checkpoint(g)
    pos, neg, empty = encode(g, clip, MOLE_PROMPT), negative(g, clip), latent(g)
    experts = mole_experts(g)
    row = [sample(g, model, pos, neg, empty, vae, "base")]
    for mode in ("local", "global", "both"):
        row.append(sample(g, mole(g, model, experts, mode, f"MoLE {mode}"), pos, neg, empty, vae, f"{mode} gates"))
    save(g, side_by_side(g, row), "base_local_global_both")
    return g


def mole_fig7_gates(sdxl: bool = False) -> Graph:
    g = mole_graph(
        "mole_fig7_gates",
        "MoLE Fig. 7: the gates at work",
        "MoLE Fig. 7",
        "The global gate of each expert per sampling step (plot) and each expert's local gate over the "
        "image (heat maps, bright = high) at the first, middle and last steps.",
        sdxl,
    )
    model, clip, vae = checkpoint(g)
    pos, neg = encode(g, clip, MOLE_PROMPT), negative(g, clip)
    recorded = g.add("MoLE_RecordGates", model=mole(g, model, mole_experts(g)))[0]
    images = sample(g, recorded, pos, neg, latent(g), vae, "MoLE (recorded)")
    maps = g.add("MoLE_GateMaps", model=recorded, images=images, steps="first, middle, last", sample=0, opacity=0.6)
    save(g, images, "image")
    save(g, maps[0], "global_gates_plot")
    save(g, maps[1], "local_gate_maps_face_hand")
    return g


# ---- MoA ----------------------------------------------------------------------------------


def moa_fig7_subject_swap() -> Graph:
    g = Graph(
        "moa_fig7_subject_swap",
        "MoA Fig. 7: subject swap at a fixed seed",
        "MoA Fig. 7",
        "One prompt and seed, three subject images: only the subject changes; layout and background "
        "come from the prior (first image: the prior alone).",
        MOA_UNIPC,
    )
    model, clip, vae = checkpoint(g)
    moa, clip_vision = moa_inputs(g)
    text = "a man sitting at a cafe table, smiling"
    neg, empty = negative(g, clip), latent(g)
    row = [sample(g, model, encode(g, clip, text, "prompt (prior)"), neg, empty, vae, "prior only")]
    for i, entry in enumerate(SUBJECTS, 1):
        patched, pos = inject(g, model, moa, clip, clip_vision, text, "man", [load_image(g, entry)], f"subject {i}")
        row.append(sample(g, patched, pos, neg, empty, vae, f"subject {i}"))
    save(g, side_by_side(g, row), "prior_then_subjects")
    return g


COUPLE_PROMPTS = [
    "a man and a woman sitting on a sofa",
    "a man and a woman reading a book together",
    "a man and a woman dancing in Paris",
    "a man and a woman on top of a mountain",
    "a man and a woman running in a park",
    "a man and a woman in a lavender farm",
    "a man and a woman, painting in the style of Van Gogh",
]


def moa_fig8_couples() -> Graph:
    g = Graph(
        "moa_fig8_couples",
        "MoA Fig. 8: two-subject couples",
        "MoA Fig. 8",
        "Subject 1 as 'man' and subject 2 as 'woman' in the paper's scenes: sofa, book, Paris, mountain, "
        "running, lavender farm, Van Gogh.",
        MOA_UNIPC,
    )
    model, clip, vae = checkpoint(g)
    moa, clip_vision = moa_inputs(g)
    man, woman = load_image(g, SUBJECTS[0], "man"), load_image(g, SUBJECTS[1], "woman")
    neg, empty = negative(g, clip), latent(g)
    row = []
    for text in COUPLE_PROMPTS:
        scene = text.split(" ", 5)[-1]
        patched, pos = inject(g, model, moa, clip, clip_vision, text, "man, woman", [man, woman], scene)
        row.append(sample(g, patched, pos, neg, empty, vae, scene))
    save(g, side_by_side(g, row), "couples")
    return g


def moa_fig11_controlnet_pose() -> Graph:
    g = Graph(
        "moa_fig11_controlnet_pose",
        "MoA Fig. 11: pose control with ControlNet",
        "MoA Fig. 11",
        "An OpenPose ControlNet fixes the pose at a fixed seed while the subject is swapped (first image: the prior).",
        MOA_UNIPC,
    )
    model, clip, vae = checkpoint(g)
    moa, clip_vision = moa_inputs(g)
    control = g.add("ControlNetLoader", control_net_name=g.file(OPENPOSE))[0]
    pose = load_image(g, POSE, "pose")
    text = "a man standing on a beach"
    neg, empty = negative(g, clip), latent(g)

    def posed(positive, title):
        applied = g.add(
            "ControlNetApplyAdvanced",
            title,
            positive=positive,
            negative=neg,
            control_net=control,
            image=pose,
            strength=1.0,
            start_percent=0.0,
            end_percent=1.0,
            vae=vae,
        )
        return applied[0], applied[1]

    pos, cn_neg = posed(encode(g, clip, text, "prompt (prior)"), "pose (prior)")
    row = [sample(g, model, pos, cn_neg, empty, vae, "prior + pose")]
    for i, entry in enumerate(SUBJECTS[:2], 1):
        patched, subject_pos = inject(
            g, model, moa, clip, clip_vision, text, "man", [load_image(g, entry)], f"subject {i}"
        )
        pos, cn_neg = posed(subject_pos, f"pose (subject {i})")
        row.append(sample(g, patched, pos, cn_neg, empty, vae, f"subject {i} + pose"))
    save(g, side_by_side(g, row), "pose_prior_then_subjects")
    return g


def moa_fig12_morphing() -> Graph:
    g = Graph(
        "moa_fig12_morphing",
        "MoA Fig. 12: subject morphing",
        "MoA Fig. 12",
        "Subject 1 morphed into subject 2 in four steps (image embeddings interpolated), same seed.",
        MOA_UNIPC,
    )
    model, clip, vae = checkpoint(g)
    moa, clip_vision = moa_inputs(g)
    first, second = load_image(g, SUBJECTS[0], "from"), load_image(g, SUBJECTS[1], "to")
    text = "a close-up photo of a man, studio light"
    neg, empty = negative(g, clip), latent(g)
    row = []
    for morph in (0.0, 0.33, 0.67, 1.0):
        patched, pos = inject(
            g,
            model,
            moa,
            clip,
            clip_vision,
            text,
            "man",
            [first],
            f"morph {morph}",
            edit_subject=1,
            morph_image=second,
            morph=morph,
        )
        row.append(sample(g, patched, pos, neg, empty, vae, f"morph {morph}"))
    save(g, side_by_side(g, row), "morph_0_to_1")
    return g


def moa_fig13_real_photo_swap() -> Graph:
    g = Graph(
        "moa_fig13_real_photo_swap",
        "MoA Fig. 13: subject swap in real photos",
        "MoA Fig. 13",
        "DDIM inversion of a real photo with the prior ('a person'), regenerated with MoA injecting the new "
        "subject: one person; two persons ('a person and a person': the kept person's crop in the first "
        "token, the new subject in the second). Limits: small faces and many people swap poorly.",
        MOA_DDIM,
    )
    model, clip, vae = checkpoint(g)
    moa, clip_vision = moa_inputs(g)
    subject = load_image(g, SUBJECTS[0], "new subject")
    neg = negative(g, clip)
    patched, pos = inject(g, model, moa, clip, clip_vision, "a person", "person", [subject], "one person")
    swap = ddim_swap(g, "swap (one person)", model, patched, pos, neg, vae, load_image(g, PHOTO_ONE, "photo"))
    save(g, swap[0], "one_person")
    keep = load_image(g, KEEP_PERSON, "person to keep")
    patched, pos = inject(
        g, model, moa, clip, clip_vision, "a person and a person", "person#1, person#2", [keep, subject], "two persons"
    )
    swap = ddim_swap(g, "swap (two persons)", model, patched, pos, neg, vae, load_image(g, PHOTO_TWO, "photo of two"))
    save(g, swap[0], "two_persons")
    return g


def ddim_swap(g: Graph, title: str, model, moa_model, positive, negative, vae, image):
    # Every widget is written, optional ones included, as the editor's "Export (API)" does.
    return g.add(
        "MoA_DDIMSwap",
        title,
        model=model,
        moa_model=moa_model,
        positive=positive,
        negative=negative,
        vae=vae,
        image=image,
        steps=g.settings.steps,
        cfg=g.settings.cfg,
        inversion_cfg=g.settings.cfg,
        refine_iters=0,
        inversion="ddim",
        null_text_iters=10,
        null_text_lr=0.01,
        null_text_early_stop=1e-5,
    )


def moa_fig21_22_style_and_timelapse() -> Graph:
    g = Graph(
        "moa_fig21_22_style_and_timelapse",
        "MoA Fig. 21 / 22: style LoRA and time lapse",
        "MoA Fig. 21 and 22",
        "A style LoRA under MoA (the subject keeps its identity in the style); and a time lapse from 'person' "
        "to 'kid' (token embeddings interpolated), same seed.",
        MOA_UNIPC,
    )
    model, clip, vae = checkpoint(g)
    moa, clip_vision = moa_inputs(g)
    subject = load_image(g, SUBJECTS[0], "subject")
    neg, empty = negative(g, clip), latent(g)
    styled = g.add(
        "LoraLoader",
        "style LoRA",
        model=model,
        clip=clip,
        lora_name=g.file(STYLE_LORA),
        strength_model=0.8,
        strength_clip=0.8,
    )
    patched, pos = inject(
        g,
        styled[0],
        moa,
        styled[1],
        clip_vision,
        "a portrait of a person, illustration",
        "person",
        [subject],
        "subject + style",
    )
    save(g, sample(g, patched, pos, neg, empty, vae, "style LoRA + MoA"), "style_lora")
    row = []
    for amount in (0.0, 0.5, 1.0):
        patched, pos = inject(
            g,
            model,
            moa,
            clip,
            clip_vision,
            "a person walking in a park",
            "person",
            [subject],
            f"time lapse {amount}",
            edit_subject=1,
            timelapse_word="kid",
            timelapse=amount,
        )
        row.append(sample(g, patched, pos, neg, empty, vae, f"person -> kid {amount}"))
    save(g, side_by_side(g, row), "timelapse_person_to_kid")
    return g


def moa_fig6_router_maps() -> Graph:
    g = Graph(
        "moa_fig6_router_maps",
        "MoA Fig. 6: router maps",
        "MoA Fig. 6",
        "The prior's router weight per pixel (bright: prior, dark: personalized) at the first, middle and last "
        "steps: averaged over layers, and for four chosen layers.",
        MOA_UNIPC,
    )
    model, clip, vae = checkpoint(g)
    moa, clip_vision = moa_inputs(g)
    man, woman = load_image(g, SUBJECTS[0], "man"), load_image(g, SUBJECTS[1], "woman")
    patched, pos = inject(g, model, moa, clip, clip_vision, COUPLE_PROMPTS[2], "man, woman", [man, woman])
    recorded = g.add("MoA_RecordRouter", model=patched)[0]
    images = sample(g, recorded, pos, negative(g, clip), latent(g), vae, "MoA (recorded)")
    save(g, images, "image")
    for layers, title in (("mean", "mean_of_layers"), ("3, 12, 20, 28", "layers_3_12_20_28")):
        maps = g.add(
            "MoA_RouterMaps",
            model=recorded,
            images=images,
            layers=layers,
            steps="first, middle, last",
            sample=0,
            opacity=0.6,
        )[0]
        save(g, maps, f"router_{title}")
    return g


FASTCOMPOSER_SETUP = f"""## Setup (once)

1. Download FastComposer's weights (MIT Han Lab, MIT license): {FASTCOMPOSER_URL}
2. From the pack's folder, convert them: the MoA file, then FastComposer's image encoder (a clip_vision file):

```
python -m training.convert_fastcomposer path/to/pytorch_model.bin --out ComfyUI/models/moa/{FC_MOA[1]}
python -m training.convert_fastcomposer path/to/pytorch_model.bin --clip-vision-out ComfyUI/models/clip_vision/{FC_CLIP_VISION[1]}
```

(or both at once: give `--out` and `--clip-vision-out` to one command). No training: the router reads the
subject words' cross-attention maps. Faces work best (FastComposer was trained on FFHQ)."""


def moa_fastcomposer_quickstart() -> Graph:
    g = Graph(
        "moa_fastcomposer_quickstart",
        "MoA without training: FastComposer's weights",
        "",
        "MoA with FastComposer's published weights, converted, and the training-free attention router: a subject "
        "swap at a fixed seed (first image: the prior alone), two-person scenes, and MoA Router Maps showing "
        "where the router gives the subjects the personalized attention (dark) at the middle and last steps.",
        MOA_UNIPC,
        setup=FASTCOMPOSER_SETUP,
    )
    model, clip, vae = checkpoint(g)
    moa = g.add("MoA_LoadRouter", "MoA (FastComposer, converted)", moa_name=g.file(FC_MOA))[0]
    clip_vision = g.add("CLIPVisionLoader", "FastComposer image encoder", clip_name=g.file(FC_CLIP_VISION))[0]
    neg, empty = negative(g, clip), latent(g)
    text = "a man sitting at a cafe table, smiling"
    row = [sample(g, model, encode(g, clip, text, "prompt (prior)"), neg, empty, vae, "prior only")]
    for i, entry in enumerate(SUBJECTS[:2], 1):
        patched, pos = inject(g, model, moa, clip, clip_vision, text, "man", [load_image(g, entry)], f"subject {i}")
        row.append(sample(g, patched, pos, neg, empty, vae, f"subject {i}"))
    save(g, side_by_side(g, row), "subject_swap")
    man, woman = load_image(g, SUBJECTS[0], "man"), load_image(g, SUBJECTS[1], "woman")
    row = []
    for text in COUPLE_PROMPTS[1:4]:
        scene = text.split(" ", 5)[-1]
        patched, pos = inject(g, model, moa, clip, clip_vision, text, "man, woman", [man, woman], scene)
        if not row:  # the first scene is recorded: its router maps are drawn below
            patched = g.add("MoA_RecordRouter", model=patched)[0]
            recorded, recorded_images = patched, None
        images = sample(g, patched, pos, neg, empty, vae, scene)
        recorded_images = recorded_images or images
        row.append(images)
    save(g, side_by_side(g, row), "couples")
    maps = g.add(
        "MoA_RouterMaps",
        model=recorded,
        images=recorded_images,
        layers="mean",
        steps="middle, last",
        sample=0,
        opacity=0.6,
    )[0]
    save(g, maps, "attention_router_maps")
    return g


def _sdxl(make):
    def make_sdxl() -> Graph:
        return make(sdxl=True)

    make_sdxl.__name__ = f"{make.__name__}_sdxl"
    return make_sdxl


# In figure order, MoLE first (each SDXL graph beside its SD1.5 twin), then MoA (the quickstart,
# which needs no training, first).
WORKFLOWS = [
    mole_fig1_lora_refinement,
    mole_fig7_gates,
    _sdxl(mole_fig7_gates),
    mole_fig8_9_comparison,
    _sdxl(mole_fig8_9_comparison),
    mole_table3_assignment_ablation,
    _sdxl(mole_table3_assignment_ablation),
    moa_fastcomposer_quickstart,
    moa_fig6_router_maps,
    moa_fig7_subject_swap,
    moa_fig8_couples,
    moa_fig11_controlnet_pose,
    moa_fig12_morphing,
    moa_fig13_real_photo_swap,
    moa_fig21_22_style_and_timelapse,
]
# The shipped file of each graph (workflows/<file>.json, its card picture <file>.jpg, and
# api/<file>.json), by the graph's name (its id here, in the tests and in output folders).
# ComfyUI 0.8.0's template browser (frontend 1.35) makes a pack's card from the file name alone:
# it is the card's title and, with "-" and "_" shown as spaces, its description; the server lists
# the files in the file system's order and the "Alphabetical" sort orders them by that name. So
# the names read as titles, and their numbers keep the order above (tests/core/test_workflow_files.py).
FILES = {
    "mole_fig1_lora_refinement": "01 MoLE Fig. 1 - refinement (SD1.5)",
    "mole_fig7_gates": "02 MoLE Fig. 7 - gate maps (SD1.5)",
    "mole_fig7_gates_sdxl": "03 MoLE Fig. 7 - gate maps (SDXL)",
    "mole_fig8_9_comparison": "04 MoLE Fig. 8, 9 - vs base (SD1.5)",
    "mole_fig8_9_comparison_sdxl": "05 MoLE Fig. 8, 9 - vs base (SDXL)",
    "mole_table3_assignment_ablation": "06 MoLE Table 3 - ablation (SD1.5)",
    "mole_table3_assignment_ablation_sdxl": "07 MoLE Table 3 - ablation (SDXL)",
    "moa_fastcomposer_quickstart": "08 MoA quickstart - no training",
    "moa_fig6_router_maps": "09 MoA Fig. 6 - router maps",
    "moa_fig7_subject_swap": "10 MoA Fig. 7 - subject swap",
    "moa_fig8_couples": "11 MoA Fig. 8 - two-subject couples",
    "moa_fig11_controlnet_pose": "12 MoA Fig. 11 - pose with ControlNet",
    "moa_fig12_morphing": "13 MoA Fig. 12 - subject morphing",
    "moa_fig13_real_photo_swap": "14 MoA Fig. 13 - swap in real photos",
    "moa_fig21_22_style_and_timelapse": "15 MoA Fig. 21, 22 - style, time lapse",
}
SDXL_WORKFLOWS = [make.__name__ for make in WORKFLOWS if make.__name__.endswith("_sdxl")]


def all_graphs() -> list[Graph]:
    return [make() for make in WORKFLOWS]
