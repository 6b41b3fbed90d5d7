"""gen_img.py --sdxl --clip_vision_strength on the tiny SDXL model, with a tiny CLIP vision model whose
projection width (32) is the tiny SDXL's pooled text width: what the U-Net is conditioned on, that
the image changes, where the model is found (folder, full-CLIP folder in the Hugging Face cache),
and the flag and missing-model errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import library.generation.runner as runner
from library.demo.tiny_sdxl import PROJECTION_DIM
from library.generation.cli import setup_parser, validate_args
from library.generation.clip_vision import DEFAULT_CLIP_VISION_MODEL
from library.generation.runner import GenerationError, load_generator, run

CPU = torch.device("cpu")
TINY_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                   patch_size=8)


def make_args(ckpt, outdir, *extra, sdxl=True):
    parser = setup_parser()
    args = parser.parse_args(["--ckpt", str(ckpt), "--outdir", str(outdir), "--W", "64", "--H", "64", "--steps", "3",
                              "--sampler", "euler", "--console_log_simple", *(["--sdxl"] if sdxl else []),
                              *map(str, extra)])
    validate_args(parser, args)
    return args


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def xl(tiny_sdxl_ckpt, tmp_path_factory):
    return load_generator(make_args(tiny_sdxl_ckpt, tmp_path_factory.mktemp("unused"), "--prompt", "x"), CPU)


@pytest.fixture(scope="module")
def init_image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("init") / "src.png"
    y, x = np.mgrid[0:64, 0:64]
    Image.fromarray(np.stack([x * 4, y * 4, (x + y) * 2], -1).astype(np.uint8)).save(path)
    return path


def tiny_vision_folder(folder: Path, *, projection_dim: int = PROJECTION_DIM, processor: bool = True) -> Path:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(5)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_VISION, projection_dim=projection_dim))
    with torch.no_grad():  # large embeddings, so that the pooled vector visibly steers the tiny U-Net
        model.visual_projection.weight.mul_(20.0)
    model.save_pretrained(folder)
    if processor:
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vision(tmp_path_factory) -> Path:
    return tiny_vision_folder(tmp_path_factory.mktemp("clip_vision") / "tiny")


def reference_embeds(folder: Path, image: Path, **config) -> torch.Tensor:
    """``image_embeds`` computed with transformers directly (the expected conditioning)."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection.from_pretrained(str(folder), local_files_only=True, **config).eval()
    processor = CLIPImageProcessor.from_pretrained(str(folder), local_files_only=True)
    with torch.no_grad():
        return model(**processor(images=Image.open(image).convert("RGB"), return_tensors="pt")).image_embeds


def pooled_and_image(xl, ckpt, outdir, *extra) -> tuple[torch.Tensor, np.ndarray]:
    """The ``text_embeds`` rows ([negative, prompt] under CFG) of the first U-Net call, and the image."""
    seen = []
    handle = xl.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["added_cond_kwargs"]["text_embeds"].clone()), with_kwargs=True)
    try:
        (path,) = run(make_args(ckpt, outdir, "--prompt", "a cat --n ugly --d 3", *extra), xl)
    finally:
        handle.remove()
    return seen[0], pixels(path)


def test_pooled_conditioning_is_strength_times_image_embeds(xl, tiny_sdxl_ckpt, vision, init_image, tmp_path):
    img2img = ["--image_path", init_image, "--strength", 0.9]
    plain_pooled, plain = pooled_and_image(xl, tiny_sdxl_ckpt, tmp_path / "plain", *img2img)
    pooled, image = pooled_and_image(xl, tiny_sdxl_ckpt, tmp_path / "cv", *img2img, "--clip_vision_strength", 1.5,
                                     "--clip_vision_model", vision)
    expected = reference_embeds(vision, init_image)[0] * 1.5
    assert pooled.shape == (2, PROJECTION_DIM)
    assert torch.allclose(pooled[1], expected, atol=1e-5)  # the prompt's row: replaced
    assert torch.equal(pooled[0], plain_pooled[0])  # the negative prompt's row: its own text embedding
    assert not torch.allclose(plain_pooled[1], expected)
    assert float(np.abs(image - plain).mean()) > 0.5
    # strength 0: the prompt's pooled vector is zero (not the text's)
    zero, _ = pooled_and_image(xl, tiny_sdxl_ckpt, tmp_path / "zero", *img2img, "--clip_vision_strength", 0,
                               "--clip_vision_model", vision)
    assert torch.count_nonzero(zero[1]) == 0 and torch.equal(zero[0], plain_pooled[0])


def test_hub_id_from_the_local_cache_and_full_clip_folders(xl, tiny_sdxl_ckpt, init_image, tmp_path, monkeypatch):
    """The default hub id found in the Hugging Face cache; its repo is a full CLIP model (model_type
    "clip", projection width top-level), and no preprocessor config falls back to CLIP's standard one."""
    import huggingface_hub.constants
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    revision = "0" * 40
    repo = tmp_path / "hub" / ("models--" + DEFAULT_CLIP_VISION_MODEL.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    torch.manual_seed(6)
    CLIPModel(CLIPConfig(projection_dim=PROJECTION_DIM, vision_config=TINY_VISION,
                         text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2))).save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    pooled, _ = pooled_and_image(xl, tiny_sdxl_ckpt, tmp_path / "out", "--image_path", init_image,
                                 "--clip_vision_strength", 1.0)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(snapshot)
    assert torch.allclose(pooled[1], reference_embeds(snapshot, init_image, projection_dim=PROJECTION_DIM)[0], atol=1e-5)


def test_flag_errors_are_early_and_one_line(tiny_sdxl_ckpt, vision, init_image, tmp_path, capsys):
    base = ["--prompt", "a", "--image_path", init_image]
    cases = [
        ([*base, "--clip_vision_strength", 1], False, "--clip_vision_strength is SDXL CLIP-Vision conditioning: add "
                                                      "--sdxl"),
        (["--prompt", "a", "--clip_vision_strength", 1], True, "add --image_path"),
        ([*base, "--clip_vision_strength", -1], True, "at least 0 (e.g. 1.0), got -1.0"),
        ([*base, "--clip_vision_strength", "nan"], True, "at least 0 (e.g. 1.0), got nan"),
        ([*base, "--clip_vision_model", vision], True, "add --clip_vision_strength"),
    ]
    for extra, sdxl, message in cases:
        with pytest.raises(SystemExit) as e:
            make_args(tiny_sdxl_ckpt, tmp_path, *extra, sdxl=sdxl)
        assert e.value.code == 2
        assert message in capsys.readouterr().err, extra


def test_missing_or_unusable_model_errors(xl, tiny_sdxl_ckpt, init_image, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_hub"))
    # checked before the SDXL model loads
    monkeypatch.setattr(runner, "load_generator", lambda *a, **k: pytest.fail("loaded the model first"))
    cv = ["--prompt", "a", "--image_path", init_image, "--clip_vision_strength", 1]
    for extra, name in (([], DEFAULT_CLIP_VISION_MODEL), (["--clip_vision_model", tmp_path / "nope"],
                                                          str(tmp_path / "nope"))):
        with pytest.raises(GenerationError) as e:
            run(make_args(tiny_sdxl_ckpt, tmp_path / "out", *cv, *extra))
        message = str(e.value)
        assert "\n" not in message
        assert message.startswith(f"--clip_vision_model {name}: no such folder and not in the local Hugging Face "
                                  "cache")
        assert f"download {DEFAULT_CLIP_VISION_MODEL}" in message and "pass --clip_vision_model FOLDER" in message
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(GenerationError, match="the folder has no config.json"):
        run(make_args(tiny_sdxl_ckpt, tmp_path / "out", *cv, "--clip_vision_model", empty))
    # a vision model without its projection: refused, not left random
    from transformers import CLIPVisionConfig, CLIPVisionModel

    CLIPVisionModel(CLIPVisionConfig(**TINY_VISION)).save_pretrained(tmp_path / "no_projection")
    with pytest.raises(GenerationError, match=r"lacks 1 weight\(s\) of a CLIPVisionModelWithProjection "
                                              r"\(e.g. visual_projection.weight\)"):
        run(make_args(tiny_sdxl_ckpt, tmp_path / "out", *cv, "--clip_vision_model", tmp_path / "no_projection"), xl)
    # a model whose image embeddings do not fit the pooled text embedding (16 vs 32)
    narrow = tiny_vision_folder(tmp_path / "narrow", projection_dim=16, processor=False)
    with pytest.raises(GenerationError, match="embeddings are 16-d but this SDXL model's pooled text embedding is 32-d"):
        run(make_args(tiny_sdxl_ckpt, tmp_path / "out", *cv, "--clip_vision_model", narrow), xl)
