"""Load MoA Router and MoA Subject Inject.

Load MoA Router reads a MoA file (models/moa) into a MOA_WEIGHTS value, with the one
ModelPatcher through which ComfyUI manages that file's weights. MoA Subject Inject binds
subject images to words of the prompt and returns the patched MODEL (see moa_patch) and the
prompt's CONDITIONING, encoded exactly as CLIPTextEncode encodes it and marked so that the
patch knows its rows at sampling time.

The parsing and the token binding are host-free (mixture_core.subjects); this file holds the
schema, the host calls and the request checked once. Every check runs before the model is
cloned: a bad input raises a ValueError naming the input (or the file) and nothing is applied;
the checks that need no model run in validate_inputs too, before the queue starts.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import uuid
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from comfy_api.latest import io

from ..mixture_core.errors import WeightFileError
from ..mixture_core.moa import MoAModel, SubjectBinding, morph_embeddings, timelapse_tokens
from ..mixture_core.moa_files import check_against_model, load_moa_file, vision_encoder_fingerprint
from ..mixture_core.subject_images import square_subject
from ..mixture_core.subjects import SubjectOptions, SubjectWord, Vocabulary, find_subject_tokens
from .moa_patch import MoASettings, SubjectsMark, apply_moa, attention_shapes, mark_conditioning
from .model_folders import file_fingerprint, full_path, safetensors_in
from .patching import weights_patcher
from .unet_layers import model_family

log = logging.getLogger(__name__)

MoAWeights = io.Custom("MOA_WEIGHTS")
# The image encoder MoA files are made for (moa.image_encoder = "clip-vit-l-14"): OpenAI CLIP
# ViT-L/14 at 224 px, whose projected CLS embedding is 768 wide.
VIT_L14 = {"hidden size": 1024, "patch": 14, "projection": 768, "layers": 24, "image size": 224}


@dataclass(frozen=True)
class LoadedMoA:
    """The value on a MOA_WEIGHTS wire: the file's weights and their one ModelPatcher, made at
    load and shared by every model MoA Subject Inject patches with them (a patcher per run
    would leave ComfyUI tracking a new handle to the same weights each time: its "memory
    leak" warnings)."""

    path: str
    model: MoAModel
    patcher: object = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.patcher is None:
            object.__setattr__(self, "patcher", weights_patcher(self.model))

    def __deepcopy__(self, memo):
        return LoadedMoA(self.path, copy.deepcopy(self.model, memo))  # its own patcher over the copy


def load_router(filename: str) -> LoadedMoA:
    path = full_path("moa", filename)
    return LoadedMoA(path, load_moa_file(path))


# ---- checks ----------------------------------------------------------------------------------


def check_moa_fits(model, moa: LoadedMoA) -> None:
    """The MoA file against the model's attention layers: same base family, every layer the
    file holds exists in the model with the same widths (WeightFileError naming the file)."""
    expected = attention_shapes(model)
    check_against_model(moa.model, expected, model_family(model), moa.path)
    text_dims = {context for layer_id, (_, context) in expected.items() if layer_id.endswith("attn2")}
    if text_dims and moa.model.fusion.text_dim not in text_dims:
        raise WeightFileError(
            moa.path,
            f"its fusion reads {moa.model.fusion.text_dim}-wide text tokens, this model's "
            f"cross-attention context is {sorted(text_dims)} wide",
        )


def check_clip_vision(clip_vision, image_dim: int) -> None:
    """clip_vision must be CLIP ViT-L/14 (224 px) with its 768-wide projection."""
    try:
        model = clip_vision.model
        vision = model.vision_model
        patch = vision.embeddings.patch_embedding.weight
        found = {
            "hidden size": int(patch.shape[0]),
            "patch": int(patch.shape[-1]),
            "projection": int(model.visual_projection.weight.shape[0]),
            "layers": len(vision.encoder.layers),
            "image size": int(clip_vision.image_size),
        }
        is_clip = vision.embeddings.class_embedding is not None
    except (AttributeError, TypeError):
        raise ValueError(
            "clip_vision: MoA needs a CLIP vision model (CLIP ViT-L/14, loaded with Load CLIP Vision); "
            f"the connected value is a {type(clip_vision).__name__} without a CLIP vision tower and projection"
        ) from None
    if found != VIT_L14 or not is_clip:
        want = ", ".join(f"{k} {v}" for k, v in VIT_L14.items())
        got = ", ".join(f"{k} {v}" for k, v in found.items())
        raise ValueError(
            f"clip_vision: MoA encodes subjects with CLIP ViT-L/14 ({want}); the connected model has {got}"
            f"{'' if is_clip else ' and no class token (not CLIP)'}. Load the CLIP ViT-L/14 vision model "
            "(OpenAI clip-vit-large-patch14) with Load CLIP Vision."
        )
    if image_dim != VIT_L14["projection"]:
        raise ValueError(
            f"the MoA file's fusion reads {image_dim}-wide image embeddings, CLIP ViT-L/14 gives {VIT_L14['projection']}"
        )


def sd1_vocabulary(clip) -> tuple[Vocabulary, object, str]:
    """(the Vocabulary of an SD1.5 CLIP's tokenizer, that tokenizer, the key of its tokens)."""
    tokenizer = getattr(clip, "tokenizer", None)
    name, key = getattr(tokenizer, "clip", None), getattr(tokenizer, "clip_name", None)
    inner = getattr(tokenizer, name, None) if isinstance(name, str) else None
    if inner is None or not hasattr(inner, "inv_vocab") or key != "l":
        raise ValueError(
            f"clip: MoA needs the SD1.5 text encoder (CLIP ViT-L/14); the connected CLIP has a "
            f"{type(tokenizer).__name__} tokenizer"
        )

    def word_ids(word: str) -> list[int]:
        ids = inner.tokenizer(word)["input_ids"]
        if inner.start_token is not None and ids and ids[0] == inner.start_token:
            ids = ids[1:]
        if inner.end_token is not None and ids and ids[-1] == inner.end_token:
            ids = ids[:-1]
        return ids

    return Vocabulary(word_ids, inner.inv_vocab, frozenset({inner.start_token, inner.end_token})), inner, key


def collect_images(images: list[tuple[str, torch.Tensor | None]]) -> list[tuple[str, torch.Tensor]]:
    """The connected image inputs in order, each checked to hold at least one image."""
    out = []
    for name, image in images:
        if image is None:
            continue
        if not isinstance(image, torch.Tensor) or image.ndim != 4:
            raise ValueError(
                f"{name}: expected an IMAGE (batch, height, width, channels), not {getattr(image, 'shape', type(image))}"
            )
        if image.shape[0] == 0 or image.shape[1] == 0 or image.shape[2] == 0:
            raise ValueError(
                f"{name} is empty (an image batch of shape {tuple(image.shape)}); connect the subject's image"
            )
        out.append((name, image))
    return out


def token_embedding_table(clip) -> torch.Tensor:
    tokenizer = clip.tokenizer
    encoder = getattr(clip.cond_stage_model, tokenizer.clip)
    return encoder.transformer.get_input_embeddings().weight


def apply_timelapse(clip, vocab: Vocabulary, key, tokens, subject: SubjectWord, position: int, word: str, alpha: float):
    """Tokens whose subject token (at `position` of the first chunk) is replaced by the input
    token embedding alpha of the way from the subject word's to `word`'s."""
    source = vocab.word_ids(subject.word)
    target = vocab.word_ids(word.strip())
    if len(source) != 1:
        raise ValueError(
            f"timelapse: the subject word {subject.word!r} is {len(source)} CLIP tokens; time lapse interpolates "
            "one token, so it needs a single-token subject word"
        )
    if len(target) != 1:
        raise ValueError(
            f"timelapse_word {word!r} is {len(target)} CLIP tokens; time lapse needs a single-token word (such as 'kid')"
        )
    table = token_embedding_table(clip)
    mixed = timelapse_tokens(table[source[0]].detach().float().cpu(), table[target[0]].detach().float().cpu(), alpha)
    out = {k: [list(chunk) for chunk in chunks] for k, chunks in tokens.items()}
    entry = out[key][0][position]
    out[key][0][position] = (mixed,) + tuple(entry[1:])
    return out


def check_image_encoder(clip_vision, moa: LoadedMoA) -> None:
    """A MoA file that names its own image encoder (moa.image_encoder_fingerprint, as files
    converted from FastComposer do) needs that encoder: another CLIP ViT-L/14 gives image
    embeddings its fusion was not made for."""
    meta = moa.model.metadata
    expected = meta.get("moa.image_encoder_fingerprint")
    if not expected:
        return
    wanted = meta.get("moa.image_encoder_file") or "its image encoder"
    try:
        layers = [int(x) for x in meta.get("moa.image_encoder_layers", "").split(",") if x.strip()]
        found = vision_encoder_fingerprint(clip_vision.model.state_dict(), layers)
    except (ValueError, AttributeError) as e:
        found = f"none ({e})"
    if found != expected:
        raise ValueError(
            f"clip_vision: the MoA file {os.path.basename(moa.path)} was made with its own image encoder, "
            f"{wanted} (in models/clip_vision), and the connected CLIP vision model is another one "
            f"(fingerprint {found}, expected {expected}). Load {wanted} with Load CLIP Vision."
        )


class SubjectEmbeddingCache:
    """The last image embeddings, per (CLIP vision model, image content): a graph that swaps prompts
    or subjects over the same photos (the couples figure runs seven samplers over two faces) encodes
    each photo once, not once per MoA Subject Inject (~1 s each for ViT-L/14 on a CPU). The model is
    held weakly and compared by identity, so a freed model's reused id never hits."""

    def __init__(self, size: int = 32):
        self.size = size
        self.entries: OrderedDict = OrderedDict()
        self.encoded = 0  # encoder calls made, for tests and logs

    @staticmethod
    def key(clip_vision, image: torch.Tensor) -> tuple:
        data = image.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
        return id(clip_vision), tuple(image.shape), hashlib.blake2b(data, digest_size=16).hexdigest()

    def embed(self, clip_vision, image: torch.Tensor) -> torch.Tensor:
        key = self.key(clip_vision, image)
        hit = self.entries.get(key)
        if hit is not None and hit[0]() is clip_vision:
            self.entries.move_to_end(key)
            return hit[1]
        with torch.no_grad():  # as ComfyUI runs nodes (inference mode): no autograd graph through the encoder
            square = square_subject(image, clip_vision.image_size)
            embedding = clip_vision.encode_image(square).image_embeds.float().cpu()
        self.encoded += 1
        self.entries[key] = (weakref.ref(clip_vision), embedding)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return embedding


SUBJECT_EMBEDDINGS = SubjectEmbeddingCache()


def encode_subject_images(clip_vision, images: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
    """(n, 768) projected CLS embeddings of every image, input by input, in order. Each image is
    padded to a square first, as MoA's training and FastComposer make subject images
    (mixture_core.subject_images): a full-body photo keeps its head, which the encoder's center
    crop would cut off. The CLIP normalization that follows is the clip_vision model's own."""
    return torch.cat([SUBJECT_EMBEDDINGS.embed(clip_vision, image) for _, image in images])


@dataclass(frozen=True)
class InjectRequest:
    """One MoA Subject Inject run: the host objects, the images and the settings."""

    model: object
    moa: LoadedMoA
    clip: object
    clip_vision: object
    text: str
    images: list  # [(input name, IMAGE or None)], in input order
    options: SubjectOptions
    morph_image: torch.Tensor | None = None

    @classmethod
    def from_inputs(
        cls,
        model,
        moa,
        clip,
        clip_vision,
        text,
        subject_words,
        image_1,
        subject_weights="1.0",
        strength=1.0,
        start_percent=0.0,
        end_percent=1.0,
        image_2=None,
        image_3=None,
        image_4=None,
        edit_subject=1,
        morph_image=None,
        morph=0.0,
        timelapse_word="",
        timelapse=0.0,
    ) -> InjectRequest:
        """From the node's inputs, by name."""
        options = SubjectOptions(
            subject_words,
            subject_weights,
            float(strength),
            float(start_percent),
            float(end_percent),
            int(edit_subject),
            float(morph),
            timelapse_word,
            float(timelapse),
            text,
        )
        images = [("image_1", image_1), ("image_2", image_2), ("image_3", image_3), ("image_4", image_4)]
        return cls(model, moa, clip, clip_vision, text, images, options, morph_image)


def inject(request: InjectRequest):
    """(patched model, marked conditioning). Every check runs before the model is cloned."""
    r, o = request, request.options
    subjects, weights = o.check(morph_image_connected=r.morph_image is not None)
    if not isinstance(r.moa, LoadedMoA):
        raise ValueError(f"moa: expected the output of Load MoA Router, not a {type(r.moa).__name__}")
    check_moa_fits(r.model, r.moa)
    check_clip_vision(r.clip_vision, r.moa.model.fusion.image_dim)
    check_image_encoder(r.clip_vision, r.moa)
    connected = collect_images(r.images)
    n_images = sum(image.shape[0] for _, image in connected)
    if n_images != len(subjects):
        shown = ", ".join(f"{name}: {image.shape[0]}" for name, image in connected) or "none connected"
        raise ValueError(
            f"subject images: {n_images} image(s) ({shown}) for {len(subjects)} subject word(s) "
            f"({', '.join(s.text for s in subjects)}); give exactly one image per subject word, in word order"
        )
    morph_image = None
    if r.morph_image is not None:
        ((_, morph_image),) = collect_images([("morph_image", r.morph_image)])
        if morph_image.shape[0] != 1:
            raise ValueError(f"morph_image holds {morph_image.shape[0]} images; give the one image to morph towards")

    vocab, _, key = sd1_vocabulary(r.clip)
    tokens = r.clip.tokenize(r.text)
    positions = find_subject_tokens(vocab, tokens[key], subjects)
    edited = o.edit_subject - 1
    if o.timelapse > 0:
        tokens = apply_timelapse(
            r.clip, vocab, key, tokens, subjects[edited], positions[edited], o.timelapse_word, o.timelapse
        )
    conditioning = r.clip.encode_from_tokens_scheduled(tokens)
    text_width = conditioning[0][0].shape[-1]
    if text_width != r.moa.model.fusion.text_dim:
        raise ValueError(
            f"clip: its text embedding is {text_width} wide, the MoA file's fusion reads {r.moa.model.fusion.text_dim}"
        )

    if o.strength == 0.0:
        return r.model.clone(), conditioning  # the router forced to the prior: the model as it is

    embeddings = encode_subject_images(r.clip_vision, connected)
    if o.morph > 0:
        target = encode_subject_images(r.clip_vision, [("morph_image", morph_image)])[0]
        embeddings[edited] = morph_embeddings(embeddings[edited], target, o.morph)
    model_sampling = r.model.get_model_object("model_sampling")
    mark = SubjectsMark(uuid.uuid4().hex, tuple(s.text for s in subjects))
    settings = MoASettings(
        strength=o.strength,
        # A file's prior_steps (FastComposer's delayed subject) delays the start as start_percent does.
        sigma_start=float(model_sampling.percent_to_sigma(max(o.start_percent, r.moa.model.router_config.prior_steps))),
        sigma_end=float(model_sampling.percent_to_sigma(o.end_percent)),
        bindings=[SubjectBinding(p, embeddings[i], weights[i]) for i, p in enumerate(positions)],
        model_sampling=model_sampling,
        mark=mark,
    )
    log.info("MoA: subjects %s at tokens %s", [s.text for s in subjects], positions)
    return apply_moa(r.model, r.moa.model, r.moa.patcher, settings), mark_conditioning(conditioning, mark)


# ---- nodes -----------------------------------------------------------------------------------


class LoadMoARouter(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MoA_LoadRouter",
            display_name="Load MoA Router",
            category="MoA",
            description="Loads a MoA file from models/moa: the personalized attentions, the routers that mix them with "
            "the model's own attention per pixel, and the fusion of subject images into prompt tokens.",
            inputs=[
                io.Combo.Input(
                    "moa_name", options=safetensors_in("moa"), tooltip="MoA file (.safetensors) in models/moa"
                )
            ],
            outputs=[MoAWeights.Output(display_name="moa")],
        )

    @classmethod
    def fingerprint_inputs(cls, moa_name=None, **_) -> tuple:
        return file_fingerprint("moa", moa_name)

    @classmethod
    def execute(cls, moa_name) -> io.NodeOutput:
        return io.NodeOutput(load_router(moa_name))


_MORE_IMAGES_TIP = "More subject images, after image_1's (see image_1)"


class MoASubjectInject(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MoA_SubjectInject",
            display_name="MoA Subject Inject",
            category="MoA",
            description="Personalizes the model with MoA: each subject image is bound to a word of the prompt. Returns the "
            "patched model and the prompt's conditioning (as CLIP Text Encode makes it): wire both to the sampler.",
            inputs=[
                io.Model.Input("model", tooltip="The model to personalize (not changed: a patched clone is returned)"),
                MoAWeights.Input("moa", tooltip="From Load MoA Router"),
                io.Clip.Input("clip", tooltip="The checkpoint's CLIP (SD1.5)"),
                io.ClipVision.Input("clip_vision", tooltip="CLIP ViT-L/14 vision model (Load CLIP Vision)"),
                io.String.Input(
                    "text",
                    multiline=True,
                    dynamic_prompts=True,
                    default="a man and a woman dancing in Paris",
                    tooltip="The prompt; it must contain every subject word",
                ),
                io.String.Input(
                    "subject_words",
                    default="man, woman",
                    tooltip="The prompt word of each subject, comma-separated, in the order of the images. "
                    "word#k picks the k-th occurrence of a word that occurs more than once",
                ),
                io.Image.Input(
                    "image_1",
                    tooltip="Subject image(s). The subject images are image_1's, then image_2's, ... "
                    "in order (a batch counts as several): one per subject word",
                ),
                io.String.Input(
                    "subject_weights",
                    default="1.0",
                    tooltip="Per-subject weight of the image in its token (0 = text only, 1 = fully fused), "
                    "comma-separated, or one number for all",
                ),
                io.Float.Input(
                    "strength",
                    default=1.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Personalization: scales the router's weight of the personalized attention; "
                    "0 returns the model unchanged",
                ),
                io.Float.Input(
                    "start_percent",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.001,
                    tooltip="MoA acts from this point of sampling (the model's own attention only before)",
                ),
                io.Float.Input(
                    "end_percent",
                    default=1.0,
                    min=0.0,
                    max=1.0,
                    step=0.001,
                    tooltip="MoA acts until this point of sampling (the model's own attention only after)",
                ),
                io.Image.Input("image_2", optional=True, tooltip=_MORE_IMAGES_TIP),
                io.Image.Input("image_3", optional=True, tooltip=_MORE_IMAGES_TIP),
                io.Image.Input("image_4", optional=True, tooltip=_MORE_IMAGES_TIP),
                io.Int.Input(
                    "edit_subject",
                    default=1,
                    min=1,
                    max=16,
                    optional=True,
                    tooltip="The subject (1 = the first word) that morph and time lapse act on",
                ),
                io.Image.Input(
                    "morph_image",
                    optional=True,
                    tooltip="Subject morphing: an image of a second subject to morph the edited subject towards",
                ),
                io.Float.Input(
                    "morph",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    optional=True,
                    tooltip="0 = the subject's image, 1 = morph_image's, between: morphed image embeddings",
                ),
                io.String.Input(
                    "timelapse_word",
                    default="",
                    optional=True,
                    tooltip="Time lapse: a one-token word (such as 'kid') to move the edited subject's word towards",
                ),
                io.Float.Input(
                    "timelapse",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    optional=True,
                    tooltip="0 = the subject word, 1 = timelapse_word: interpolated token embeddings",
                ),
            ],
            outputs=[io.Model.Output(), io.Conditioning.Output(display_name="positive")],
        )

    @classmethod
    def validate_inputs(
        cls,
        subject_words=None,
        subject_weights=None,
        strength=None,
        start_percent=None,
        end_percent=None,
        edit_subject=None,
        morph=None,
        timelapse_word=None,
        timelapse=None,
        text=None,
    ) -> bool | str:
        """The checks that need no model, on the widget values, before the queue runs (a value
        wired from another node arrives as None: left to execute). Naming these inputs here
        replaces ComfyUI's own range checks of them, so every range is checked below."""
        if subject_words is None:
            return True
        given = dict(
            subject_weights=subject_weights,
            strength=strength,
            start_percent=start_percent,
            end_percent=end_percent,
            edit_subject=edit_subject,
            morph=morph,
            timelapse_word=timelapse_word,
            timelapse=timelapse,
        )
        defaults = SubjectOptions(subject_words)
        values = {k: (getattr(defaults, k) if v is None else v) for k, v in given.items()}
        try:
            SubjectOptions(subject_words, text=text, **values).check()
        except (ValueError, TypeError) as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, **inputs) -> io.NodeOutput:
        return io.NodeOutput(*inject(InjectRequest.from_inputs(**inputs)))


NODES = [LoadMoARouter, MoASubjectInject]
