"""The bundled demo model and the quick start: it loads as a real SD1 file, draws what it is asked,
and a LoRA trained by the quick start teaches it the example concept without breaking the rest."""

from __future__ import annotations

import functools
import re

from safetensors import safe_open

from library.demo.colour_check import CHECK_PROMPTS, closest_colour, generate, region_colours
from library.demo.demo_model import DEMO_MODEL
from tests.reference import load_reference


def test_demo_model_is_a_small_sd1_single_file():
    assert DEMO_MODEL.is_file()
    assert DEMO_MODEL.stat().st_size <= 25 * 1000 * 1000
    with safe_open(str(DEMO_MODEL), "pt") as f:
        keys = set(f.keys())
        dtypes = {f.get_slice(k).get_dtype() for k in keys}
    assert dtypes == {"F16"}
    # The real SD1 layout: with block indices abstracted, every key is a key of a real SD1 file.
    real = load_reference("checkpoint_keys.json")["sd15_single_file_keys"]
    pattern = functools.partial(re.sub, r"(?<=\.)\d+(?=\.)", "N")
    assert {pattern(k) for k in keys} <= {pattern(k) for k in real}
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys


def test_demo_model_vocabulary_is_clips():
    from library.families.sd.loading import load_sd_models

    sd = load_sd_models(str(DEMO_MODEL), v2=False, keep_extras=False)
    assert sd.text_encoder.get_input_embeddings().weight.shape[0] == len(sd.tokenizer) == 49408
    assert sd.tokenizer("a red circle").input_ids[1:-1] == sd.tokenizer.convert_tokens_to_ids(["a</w>", "red</w>", "circle</w>"])


def test_demo_model_draws_the_requested_colours():
    prompts = [f"a {c} {s} on a {b} background" for c, s, b in CHECK_PROMPTS]
    images = generate(DEMO_MODEL, prompts, seed=0)
    got = [tuple(closest_colour(region) for region in region_colours(image)) for image in images]
    assert got == [(c, b) for c, _, b in CHECK_PROMPTS]


def test_quickstart_lora_learns_the_concept(tmp_path):
    from tools.quickstart import main

    result = main(["--workdir", str(tmp_path / "demo"), "--steps", "120"])
    def mean(values):
        return sum(values) / len(values)

    # The trigger prompts move towards the stars of the training set ...
    assert mean(result["trigger_after"]) < 0.85 * mean(result["trigger_before"]), result
    # ... while the prompts without the trigger word change much less than the trigger prompts do.
    assert mean(result["other_change"]) < 0.6 * mean(result["trigger_change"]), result
    from PIL import Image

    with Image.open(tmp_path / "demo" / "before_after.png") as grid:  # 5 prompts x (without, with), 2x enlarged
        assert grid.size == (5 * 128 + 4 * 4, 2 * 128 + 4)
    with safe_open(str(tmp_path / "demo" / "output" / "sks_star.safetensors"), "pt") as f:
        assert f.metadata()["ss_network_module"] == "networks.lora"
