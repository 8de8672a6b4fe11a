"""Writing a workflow as an API-format graph (class_type + inputs), with its note and the download
entries of the files it names; and the building blocks the figure graphs share."""

from __future__ import annotations

from dataclasses import dataclass, field

from .catalogue import CHECKPOINT, FASTCOMPOSER, NEGATIVE, SEED, File, Settings


@dataclass
class Graph:
    name: str  # the graph's id (tests, output folders, screenshots)
    title: str
    figure: str
    shows: str
    settings: Settings
    file_stem: str = ""  # the shipped files' name: workflows/<stem>.json, <stem>.jpg, api/<stem>.json
    base: str = "SD1.5"
    checkpoint: File = CHECKPOINT
    files_note: str = ""
    setup: str = ""  # Markdown put in the note before the file list (download steps)
    nodes: dict = field(default_factory=dict)
    files: list = field(default_factory=list)

    def add(self, class_type: str, title: str | None = None, **inputs) -> Ref:
        node_id = str(len(self.nodes) + 1)
        node = {"inputs": inputs, "class_type": class_type}
        if title:
            node["_meta"] = {"title": title}
        self.nodes[node_id] = node
        return Ref(node_id)

    def file(self, entry: File | tuple) -> str:
        """The widget value naming `entry` (a File, or a plain (folder, name) pair)."""
        if not isinstance(entry, File):
            entry = File(entry[0], entry[1], "")
        if entry not in self.files:
            self.files.append(entry)
        return entry.name

    @property
    def trained_files(self) -> list[File]:
        """The model files only training makes (no public download)."""
        return [f for f in self.files if f.folder != "input" and not f.url]

    def models(self, node_id: str) -> list[dict]:
        """The download entries of one node: the frontend uses a node's entry when its name equals
        one of the node's widget values."""
        values = {v for v in self.nodes[node_id]["inputs"].values() if isinstance(v, str)}
        return [f.model for f in self.files if f.model and f.name in values]

    def note(self) -> str:
        intro = f"Reproduces {self.figure}. {self.shows}" if self.figure else self.shows
        lines = [f"# {self.title}", "", intro, "", *([self.setup, ""] if self.setup else [])]
        lines += [f"Sampling: {self.settings.source}.", "", "## Files it needs", ""]
        for f in self.files:
            where = "ComfyUI/input/" if f.folder == "input" else f"ComfyUI/models/{f.folder}/"
            how = f" Download: {f.url}" if f.url else (" **Train first.**" if f.folder != "input" else "")
            lines.append(f"- `{f.name}` in `{where}`: {f.where}.{how}")
        if any(f.url for f in self.files):
            lines += [
                "",
                "Opened with a file missing, the editor's Missing Models dialog lists it with its download "
                "(a Download button; for a .bin the dialog says it downloads only .safetensors: use Copy URL "
                "or the link above).",
            ]
        if self.trained_files:
            lines += [
                "",
                "No weights for these are published: make them with the pack's `training/` scripts "
                "(training/README.md), then run the graph.",
            ]
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


def side_by_side(g: Graph, images: list, title: str | None = None):
    """One IMAGE batch of several images: ComfyUI's Batch Images (its inputs grow as they are
    linked: images.image0, images.image1, ...), which replaces the deprecated ImageBatch."""
    return g.add("BatchImagesNode", title, **{f"images.image{i}": image for i, image in enumerate(images)})[0]


def save(g: Graph, images, prefix: str):
    g.add("SaveImage", f"Save: {prefix}", images=images, filename_prefix=f"{g.name}/{prefix}")


def load_image(g: Graph, entry: File | tuple, title=None):
    return g.add("LoadImage", title, image=g.file(entry))[0]


def moa_router(g: Graph, title: str = "MoA weights (FastComposer)"):
    """Load MoA Router on FastComposer's published weights: its own image encoder comes with them,
    so MoA Subject Inject's clip_vision stays unwired."""
    return g.add("MoA_LoadRouter", title, moa_name=g.file(FASTCOMPOSER))[0]


def inject(g: Graph, model, moa, clip, clip_vision, text, words, images, title=None, **extra):
    """MoA Subject Inject; clip_vision None leaves it unwired (the MoA file's own image encoder)."""
    # Every widget is written, optional ones included, as the editor's "Export (API)" does.
    widgets = dict(edit_subject=1, morph=0.0, timelapse_word="", timelapse=0.0) | extra
    vision = {} if clip_vision is None else {"clip_vision": clip_vision}
    node = g.add(
        "MoA_SubjectInject",
        title,
        model=model,
        moa=moa,
        clip=clip,
        **vision,
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
