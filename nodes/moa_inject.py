"""MoA Subject Inject's work: the request checked once, then the patched model and the marked
conditioning.

Every check runs before the model is cloned: a bad input raises a ValueError naming the input
(or the file) and nothing is applied. The parsing and the token binding are host-free
(mixture_core.subjects); the CLIP and CLIP vision adapters are in moa_host.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass

import torch

from ..mixture_core.errors import WeightFileError
from ..mixture_core.moa import SubjectBinding, morph_embeddings
from ..mixture_core.moa_files import check_against_model, vision_encoder_fingerprint
from ..mixture_core.subjects import SubjectOptions, find_subject_tokens
from .moa_host import apply_timelapse, check_clip_vision, collect_images, encode_subject_images, sd1_vocabulary
from .moa_loading import LoadedMoA
from .moa_patch import MoASettings, SubjectsMark, apply_moa, attention_shapes, mark_conditioning
from .unet_layers import model_family

log = logging.getLogger(__name__)


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


def image_encoder(clip_vision, moa: LoadedMoA):
    """The CLIP vision model MoA Subject Inject encodes with: the one wired, else the one the MoA
    file brings (FastComposer's pytorch_model.bin brings its fine-tuned encoder)."""
    if clip_vision is not None:
        return clip_vision
    if moa.clip_vision is not None:
        return moa.clip_vision
    wanted = moa.model.metadata.get("moa.image_encoder_file")
    raise ValueError(
        f"clip_vision: the MoA file {os.path.basename(moa.path)} brings no image encoder; wire Load CLIP Vision "
        f"with the CLIP ViT-L/14 the file was trained with ({wanted or 'OpenAI clip-vit-large-patch14'}) "
        "to clip_vision"
    )


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
        name = os.path.basename(moa.path)
        if moa.clip_vision is not None:
            raise ValueError(
                f"clip_vision: the MoA file {name} brings its own image encoder, and the connected CLIP vision "
                f"model is another one (fingerprint {found}, expected {expected}). Disconnect clip_vision: "
                "unwired, MoA Subject Inject uses the file's encoder."
            )
        raise ValueError(
            f"clip_vision: the MoA file {name} was made with its own image encoder, "
            f"{wanted} (in models/clip_vision), and the connected CLIP vision model is another one "
            f"(fingerprint {found}, expected {expected}). Load {wanted} with Load CLIP Vision."
        )


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
        text,
        subject_words,
        image_1,
        clip_vision=None,
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
    clip_vision = image_encoder(r.clip_vision, r.moa)
    check_clip_vision(clip_vision, r.moa.model.fusion.image_dim)
    check_image_encoder(clip_vision, r.moa)
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

    embeddings = encode_subject_images(clip_vision, connected)
    if o.morph > 0:
        target = encode_subject_images(clip_vision, [("morph_image", morph_image)])[0]
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
