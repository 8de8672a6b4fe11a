"""Each metric's code path on randomly initialised models of its architecture (tests/helpers/
quality_metrics.py says which are tiny), checked against the packages' own forward passes; and
the messages of metrics that cannot get their weights. Nothing is downloaded."""

from __future__ import annotations

import pytest
import torch
from helpers import quality_metrics as qm
from PIL import Image

from quality import metrics

pytestmark = pytest.mark.slow


def picture(seed=0, size=(96, 80)):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.rand(size[1], size[0], 3, generator=g).mul(255).byte().numpy())


def test_clip_score_is_clips_image_text_cosine():
    clip = qm.tiny_clip()
    processor = clip.image_processor  # OpenAI's preprocessing, as FastComposer's clip.load("ViT-L/14")
    assert processor.resample == 3 and list(processor.image_mean) == [0.48145466, 0.4578275, 0.40821073]
    assert processor(images=picture(size=(300, 200)), return_tensors="pt")["pixel_values"].shape == (1, 3, 224, 224)
    image, prompt = picture(), "a man wearing a red hat"
    score = clip.score(image, prompt)
    with torch.no_grad():  # by hand: projected, normalised embeddings of the two towers
        ids = clip.tokenizer([prompt], return_tensors="pt")["input_ids"]
        text = clip.model.text_projection(clip.model.text_model(input_ids=ids).pooler_output)
        pixels = processor(images=image, return_tensors="pt")["pixel_values"]
        img = clip.model.visual_projection(clip.model.vision_model(pixel_values=pixels).pooler_output)
    assert score == pytest.approx(torch.nn.functional.cosine_similarity(text, img).item(), abs=1e-5)
    assert clip.score(image, "a watercolor painting of a woman") != pytest.approx(score, abs=1e-6)
    assert isinstance(
        clip.score(image, "word " * 200), float
    )  # longer than 77 tokens: truncated, as clip.tokenize(truncate)


def test_hps_is_open_clips_feature_dot_product_and_loads_the_hps_file_layout(tmp_path):
    hps = qm.tiny_hps(tmp_path)
    image, prompt = picture(1), "a man riding a wave on top of a surfboard"
    score = hps.score(image, prompt)
    with torch.no_grad():  # hpsv2/img_score.py: outputs = model(image, text); image_features @ text_features.T
        out = hps.model(hps.preprocess(image).unsqueeze(0), hps.tokenizer([prompt]))
        features = out if isinstance(out, dict) else {"image_features": out[0], "text_features": out[1]}
    assert score == pytest.approx((features["image_features"] @ features["text_features"].T).item(), abs=1e-5)
    checkpoint = tmp_path / "HPS_tiny.pt"  # the HPS file's layout: {"state_dict": ...}
    torch.save({"state_dict": hps.model.state_dict()}, checkpoint)
    loaded = metrics.HPSv2.load(str(checkpoint), device=qm.CPU, architecture="hps-tiny-test")
    assert loaded.score(image, prompt) == pytest.approx(score, abs=1e-6)


def test_face_similarity_detects_faces_first_as_fastcomposer():
    face = qm.random_face()
    photo = Image.open(qm.face_photo()).convert("RGB").resize((256, 300))  # smaller: MTCNN's pyramid is faster
    assert face.score(photo, reference=photo) == pytest.approx(1.0, abs=1e-4)  # same face, same embedding
    boxes, probabilities = face.detector.detect(photo)
    assert len(boxes) == 1 and probabilities[0] > 0.9  # MTCNN's real weights find the one face
    # A random FaceNet maps all faces close together; what is checked is the path: the first
    # face crop of each image, embedded, their cosine clipped at 0.
    mirrored = photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    crops = [face.detector(image)[:1] for image in (mirrored, photo)]
    assert crops[0].shape == (1, 3, 160, 160) and not torch.equal(crops[0], crops[1])
    with torch.no_grad():
        a, b = (face.embedder(c) for c in crops)
    assert face.score(mirrored, reference=photo) == pytest.approx(max((a * b).sum().item(), 0.0), abs=1e-6)
    assert face.score(picture(2), reference=photo) == 0.0  # no face generated: 0, as FastComposer
    with pytest.raises(ValueError, match="no face found in the reference image"):
        face.score(photo, reference=picture(3))


def test_metrics_without_weights_say_what_to_download(tmp_path):
    with pytest.raises(metrics.MetricUnavailable, match=r"HPS_v2_compressed.pt .*xswu/HPSv2"):
        metrics.HPSv2.load(str(tmp_path / "missing.pt"), device=qm.CPU)
    with pytest.raises(metrics.MetricUnavailable, match="huggingface-cli download openai/clip-vit-large-patch14"):
        metrics.ClipScore.load(str(tmp_path), device=qm.CPU)  # a folder without the model's files


def test_imagereward_up_to_what_this_environment_allows(tmp_path, monkeypatch):
    """image-reward 1.5's BLIP code imports helpers that transformers 5 removed: there it must
    stop with that reason; with transformers 4 it imports, and without its weights it names them."""
    import importlib.util

    import transformers

    if importlib.util.find_spec("ImageReward") is None:  # (importing the package itself needs diffusers)
        pytest.skip("image-reward is not installed (the quality extra)")

    if int(transformers.__version__.split(".")[0]) >= 5:
        with pytest.raises(metrics.MetricUnavailable, match=r"needs transformers<5"):
            metrics.imagereward_module()
        return
    module = metrics.imagereward_module()
    # The model class from the installed package's own file, without its __init__ (which imports
    # the training code, ReFL.py, and with it diffusers).
    import sys
    from pathlib import Path

    assert issubclass(module.ImageReward, torch.nn.Module) and issubclass(module.MLP, torch.nn.Module)
    package = Path(importlib.util.find_spec("ImageReward").origin).parent
    assert Path(module.__file__).resolve() == (package / "ImageReward.py").resolve()
    assert "ImageReward.ReFL" not in sys.modules
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(metrics.MetricUnavailable, match="THUDM/ImageReward"):
        metrics.ImageReward.load(str(tmp_path), device=qm.CPU)
