"""Load MoA Router and MoA Subject Inject: the node schemas.

Load MoA Router reads a MoA file, or FastComposer's published pytorch_model.bin, from
models/moa into a MOA_WEIGHTS value (moa_loading). MoA Subject Inject binds subject images to
words of the prompt and returns the patched MODEL and the prompt's CONDITIONING, encoded exactly
as CLIPTextEncode encodes it and marked so that the patch knows its rows at sampling time
(moa_inject). The checks that need no model run in validate_inputs too, before the queue starts.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..mixture_core.subjects import SubjectOptions

# The host adapters and the work, importable from here as before (tests, scripts).
from .moa_host import (  # noqa: F401
    SUBJECT_EMBEDDINGS,
    VIT_L14,
    apply_timelapse,
    check_clip_vision,
    encode_subject_images,
    sd1_vocabulary,
    square_subject,
    token_embedding_table,
)
from .moa_inject import InjectRequest, check_image_encoder, check_moa_fits, inject  # noqa: F401
from .moa_loading import FASTCOMPOSER_FILE, LoadedMoA, load_router, moa_choices  # noqa: F401
from .model_folders import file_fingerprint

MoAWeights = io.Custom("MOA_WEIGHTS")


class LoadMoARouter(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        options = moa_choices()
        return io.Schema(
            node_id="MoA_LoadRouter",
            display_name="Load MoA Router",
            category="MoA",
            description="Loads a MoA file from models/moa: the personalized attentions, the routers that mix them with "
            "the model's own attention per pixel, and the fusion of subject images into prompt tokens. "
            f"FastComposer's published {FASTCOMPOSER_FILE} is read as it is (converted once, then cached) and "
            "brings its own image encoder.",
            inputs=[
                io.Combo.Input(
                    "moa_name",
                    options=options,
                    # FastComposer's file (the templates' value) unless only other files are there
                    default=FASTCOMPOSER_FILE if FASTCOMPOSER_FILE in options or not options else options[0],
                    tooltip=f"MoA file (.safetensors) in models/moa, or FastComposer's {FASTCOMPOSER_FILE} "
                    "(huggingface.co/mit-han-lab/fastcomposer) put there as downloaded",
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
                io.ClipVision.Input(
                    "clip_vision",
                    optional=True,
                    tooltip="Leave unwired when the MoA file brings its own image encoder (FastComposer's "
                    "pytorch_model.bin does); else the CLIP ViT-L/14 the file was trained with (Load CLIP Vision)",
                ),
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
        replaces ComfyUI's own range checks of them, so every range is checked below.

        A mistake is raised, not returned: ComfyUI (execution.validate_inputs) reports a returned
        message once per argument of this method, ten times the same sentence; an exception is
        reported once, on this node ("Exception when validating inner node: <message>")."""
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
        SubjectOptions(subject_words, text=text, **values).check()
        return True

    @classmethod
    def execute(cls, **inputs) -> io.NodeOutput:
        return io.NodeOutput(*inject(InjectRequest.from_inputs(**inputs)))


NODES = [LoadMoARouter, MoASubjectInject]
