"""Property-based fuzzing of the text and config parsers (issue #11).

For arbitrary input each parser either returns a well-formed result or raises the project's own
error type with a message (``DatasetError``, ``PromptFileError``, ``SystemExit`` from argparse /
``ArgumentError``); never ``IndexError``, ``KeyError``, ``TypeError``, ``RecursionError``,
``ZeroDivisionError``, ``UnicodeDecodeError``... Where a real property is known it is asserted
too (shuffling keeps the multiset of tags, ``keep_tokens`` keeps the head, weights are finite and
parse back to the text, options land in their documented ranges).

Parsers covered: captions (``library/data/captions.py``), A1111 weights
(``library/prompt_weights.py``), dynamic prompts (``library/generation/dynamic_prompts.py``),
sample-prompt lines and files (``library/sampling/prompts.py``), the dataset TOML/JSON config
(``library/dataset_config.py`` + ``library/data/config_schema.py``, built into a dataset group on
two tiny images) and ``--config_file`` (``library/config_file.py``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import re
from collections import Counter
from pathlib import Path

import pytest
import toml
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from library.args import setup_network_parser
from library.config_file import parse_args_with_config
from library.data.captions import (CaptionOptions, TrainingPosition, expand_wildcards, process_caption,
                                   read_caption_file, split_tags, tag_frequency, token_warmup_count)
from library.data.errors import DatasetError
from library.dataset_config import build_dataset_group, load_config_file
from library.generation.dynamic_prompts import expand_dynamic_prompt
from library.generation.runner import GEN_IMG_OPTIONS, parse_gen_line
from library.prompt_weights import BREAK, apply_token_weights, is_break, parse_prompt_weights
from library.sampling.prompts import (PROMPT_FILE_KEYS, SAMPLE_PROMPT_OPTIONS, PromptDefaults, PromptFileError,
                                      SamplePrompt, load_prompts, parse_prompt_line)
from tests.data_helpers import parse, write_image

# FUZZ_EXAMPLES=5000 for a deeper search; 200 keeps the file to a few seconds per test in the suite.
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "200")), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# Text that exercises the markup of every parser: separators, brackets, escapes, options.
_PIECES = list("ab ,;|{}()[]:\\$e1.5-\n\t\x00\u00e9\U0001f600") + ["BREAK", " --", "$$", "|||", "{{", "}}"]
MARKUP = st.lists(st.sampled_from(_PIECES), max_size=30).map("".join)
ANY_TEXT = st.one_of(st.text(max_size=60), MARKUP)


# ------------------------------------------------------------------------------------------ captions

def caption_options(separator=st.sampled_from([",", ";", " ", "|", ", ", "::"])) -> st.SearchStrategy:
    return st.builds(
        CaptionOptions,
        shuffle_caption=st.booleans(),
        caption_separator=separator,
        keep_tokens=st.integers(-3, 6),
        keep_tokens_separator=st.sampled_from(["", "|||", "|", ",", "{", "\n"]),
        secondary_separator=st.sampled_from([None, "", ";;;", ";", " "]),
        enable_wildcard=st.booleans(),
        caption_prefix=st.sampled_from([None, "", "photo of", "{a|b}", "(x:2)"]),
        caption_suffix=st.sampled_from([None, "", "best", "|||", "}"]),
        caption_dropout_rate=st.sampled_from([0.0, 0.0, 0.3, 1.0]),
        caption_dropout_every_n_epochs=st.integers(-2, 3),
        caption_tag_dropout_rate=st.sampled_from([0.0, 0.0, 0.5, 1.0]),
        token_warmup_min=st.integers(-3, 5),
        token_warmup_step=st.sampled_from([0, 0, 0.5, 0.999, 1, 3, 10, -1]),
    )


positions = st.builds(TrainingPosition, epoch=st.integers(1, 6), step=st.integers(0, 20),
                      max_train_steps=st.integers(0, 20))
# textual inversion's replacements: token strings, and "" (the whole caption) -> a list of templates
replacements = st.fixed_dictionaries({}, optional={
    "a": st.text(max_size=5), "sks": st.text(max_size=5), ",": st.text(max_size=3),
    "": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), min_size=1, max_size=3))})


@FUZZ
@given(ANY_TEXT, caption_options(), positions, st.integers(0, 2 ** 32), replacements)
def test_process_caption_never_crashes(caption, opts, pos, seed, repl):
    out = process_caption(caption, opts, random.Random(seed), pos, repl)
    assert isinstance(out, str)
    # the same seed gives the same caption: what makes --resume and DataLoader workers exact
    assert process_caption(caption, opts, random.Random(seed), pos, repl) == out


TAG = st.text(alphabet="abcxyz _()0123", min_size=1, max_size=6).filter(lambda t: t.strip())


@FUZZ
@given(st.lists(TAG, max_size=10), st.integers(0, 12), st.integers(0, 2 ** 32))
def test_shuffle_keeps_the_tags_and_the_kept_head(tags, keep, seed):
    caption = ",".join(tags)
    opts = CaptionOptions(shuffle_caption=True, keep_tokens=keep)
    out = process_caption(caption, opts, random.Random(seed), TrainingPosition())
    original, shuffled = split_tags(caption, ","), split_tags(out, ",")
    assert Counter(shuffled) == Counter(original)
    assert shuffled[:keep] == original[:keep]


@FUZZ
@given(st.lists(TAG, max_size=6), st.lists(TAG, max_size=6), st.lists(TAG, max_size=4), st.integers(0, 2 ** 32))
def test_keep_tokens_separator_keeps_head_and_tail(head, flex, tail, seed):
    caption = ",".join(head) + " ||| " + ",".join(flex) + " ||| " + ",".join(tail)
    opts = CaptionOptions(shuffle_caption=True, keep_tokens_separator="|||", caption_tag_dropout_rate=1.0)
    out = split_tags(process_caption(caption, opts, random.Random(seed), TrainingPosition()), ",")
    # every flexible tag is dropped at rate 1; the fixed head and tail stay in place
    assert out == [t.strip() for t in head + tail if t.strip()]


@FUZZ
@given(st.lists(st.lists(st.text(alphabet="abc xyz", min_size=1, max_size=4), min_size=1, max_size=4), max_size=4),
       st.text(alphabet="abc, ", max_size=6), st.integers(0, 2 ** 32))
def test_wildcards_pick_one_alternative(groups, glue, seed):
    text = glue.join("{" + "|".join(g) + "}" for g in groups) + "{{lit}}"
    out = expand_wildcards(text, random.Random(seed))
    pattern = re.escape(glue).join("(?:" + "|".join(map(re.escape, g)) + ")" for g in groups) + re.escape("{lit}")
    assert re.fullmatch(pattern, out), (text, out)


@FUZZ
@given(st.integers(0, 30), caption_options(), positions)
def test_token_warmup_count_in_range(num_flex, opts, pos):
    assert 0 <= token_warmup_count(num_flex, opts, pos) <= num_flex


@FUZZ
@given(st.binary(max_size=60))
def test_caption_files_read_or_dataset_error(tmp_path, data):
    path = tmp_path / "c.txt"
    path.write_bytes(data)
    for wildcard in (False, True):
        try:
            caption = read_caption_file(path, enable_wildcard=wildcard)
        except DatasetError as e:
            assert str(path) in str(e)
            continue
        assert caption and caption == caption.strip() and (wildcard or "\n" not in caption)
    tag_frequency([data.decode("utf-8", "replace")], ",")


# ------------------------------------------------------------------------------- prompt weights

@FUZZ
@given(ANY_TEXT, st.booleans())
def test_prompt_weights_well_formed(text, breaks):
    segments = parse_prompt_weights(text, breaks=breaks)
    assert segments
    for segment in segments:
        piece, weight = segment
        assert isinstance(piece, str) and isinstance(weight, float) and math.isfinite(weight)
        assert is_break(segment) or (breaks is False and piece == "") or piece or len(segments) == 1
    joined = "".join(BREAK if is_break(s) else s[0] for s in segments)
    # markup is only ever removed: the parsed text is a subsequence of the input ...
    it = iter(text)
    assert all(ch in it for ch in joined)
    # ... and text without any markup character parses back to itself with weight 1
    if not set(text) & set("()[]\\"):
        assert joined == text
        assert all(segment[1] == 1.0 for segment in segments if not is_break(segment))


@FUZZ
@given(st.lists(st.tuples(st.text(alphabet="abc xy", min_size=1, max_size=5),
                          st.floats(0.1, 3.0).map(lambda w: round(w, 2))), min_size=1, max_size=5))
def test_explicit_weights_parse_back(spans):
    text = "".join(f"({s}:{w})" for s, w in spans)
    per_char = [(c, w) for s, w in parse_prompt_weights(text) for c in s]
    assert per_char == [(c, pytest.approx(w)) for s, w in spans for c in s]


@pytest.mark.parametrize("text", [
    "((x:" + "9" * 300 + "):" + "9" * 300 + ")",
    "(" * 5 + "x:" + "9" * 308 + ")" * 5,
    "(" * 5 + "x:" + "9" * 308,
])
def test_overflowing_weights_stay_finite(text):
    assert all(math.isfinite(w) for _, w in parse_prompt_weights(text))


@FUZZ
@given(MARKUP, st.integers(0, 2 ** 16), st.sampled_from(["original", "abs", "none"]), st.booleans())
def test_apply_token_weights_is_finite(text, seed, mode, layer_norm):
    weights = [w for s, w in parse_prompt_weights(text, breaks=False) for _ in s] or [1.0]
    weights = torch.tensor([[1.0, *weights[:20], 1.0]])
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, weights.shape[1], 16, generator=gen)
    if layer_norm:  # what an encoder ending in a LayerNorm gives: every token's mean is float noise around 0
        hidden = torch.nn.functional.layer_norm(hidden, (16,))
    out = apply_token_weights(hidden, weights, mode)
    assert out.shape == hidden.shape and torch.isfinite(out).all()
    scaled = hidden * weights[..., None]
    if mode == "none":
        torch.testing.assert_close(out, scaled)
    elif layer_norm and mode == "original":
        # the mean is rounding noise: rescaling by noise/noise would be arbitrary, so none is applied
        torch.testing.assert_close(out, scaled)
    elif mode == "original" and scaled.mean().abs() > 1e-3 * scaled.abs().mean():
        assert out.mean().item() == pytest.approx(hidden.mean().item(), rel=1e-3, abs=1e-6)


# ------------------------------------------------------------------------------- dynamic prompts

@FUZZ
@given(ANY_TEXT, st.integers(0, 2 ** 32))
def test_dynamic_prompts_never_crash(text, seed):
    got = expand_dynamic_prompt(text, random.Random(seed))
    assert got and all(isinstance(p, str) for p in got)
    assert expand_dynamic_prompt(text, random.Random(seed)) == got
    for prompt in got:
        parse_prompt_weights(prompt)


@FUZZ
@given(st.lists(st.lists(st.text(alphabet="abc xy", min_size=1, max_size=3), min_size=1, max_size=3, unique=True),
                max_size=3), st.integers(0, 2 ** 32))
def test_enumerated_groups_give_the_product(groups, seed):
    text = "-".join("{e$$" + "|".join(g) + "}" for g in groups)
    got = expand_dynamic_prompt(text, random.Random(seed))
    expected = ["-".join(combo) for combo in itertools.product(*groups)]
    assert got == expected


# ------------------------------------------------------------------------------- sample prompts

_FLAGS = sorted(SAMPLE_PROMPT_OPTIONS) + ["W", "SS", "x", "", "--"]
_VALUES = st.one_of(st.integers(-10 ** 20, 10 ** 20).map(str), st.floats(allow_nan=True).map(str),
                    st.sampled_from(["", "euler_a", "DDIM", "nan", "inf", "-inf", "1e999", "0x10", " 5 ", "a b"]),
                    st.text(max_size=8))


@st.composite
def prompt_lines(draw):
    head = draw(st.one_of(st.just(""), st.text(max_size=20), MARKUP))
    options = draw(st.lists(st.tuples(st.sampled_from(_FLAGS), _VALUES), max_size=5))
    return head + "".join(f" --{flag} {value}" for flag, value in options)


def check_sample_prompt(p: SamplePrompt, defaults: PromptDefaults = PromptDefaults()) -> None:
    assert isinstance(p.prompt, str) and isinstance(p.negative_prompt, str)
    for size in (p.width, p.height):
        assert isinstance(size, int) and size >= defaults.min_size and size % defaults.size_multiple == 0
    assert isinstance(p.steps, int) and 1 <= p.steps <= defaults.max_steps
    assert isinstance(p.scale, float) and math.isfinite(p.scale)
    for value in (p.guidance_scale, p.cfg_trunc_ratio, p.renorm_cfg, p.flow_shift):
        assert value is None or (isinstance(value, float) and math.isfinite(value))
    assert p.seed is None or (isinstance(p.seed, int) and 0 <= p.seed < 2 ** 64)
    assert p.sampler is None or (p.sampler and p.sampler == p.sampler.lower())


@FUZZ
@given(st.one_of(prompt_lines(), ANY_TEXT))
def test_prompt_lines_parse_or_prompt_file_error(line):
    try:
        prompt = parse_prompt_line(line, source="p.txt:1")
    except PromptFileError as e:
        assert str(e).startswith("p.txt:1: ")
        return
    check_sample_prompt(prompt)


_GEN_FLAGS = sorted(GEN_IMG_OPTIONS) + ["x", ""]


@st.composite
def gen_lines(draw):
    head = draw(st.one_of(st.just(""), st.text(max_size=20), MARKUP))
    options = draw(st.lists(st.tuples(st.sampled_from(_GEN_FLAGS), _VALUES | st.sampled_from(["1,2", "none", "0.5"])),
                            max_size=5))
    return head + "".join(f" --{flag} {value}" for flag, value in options)


@FUZZ
@given(st.one_of(gen_lines(), ANY_TEXT))
def test_gen_img_prompt_lines_parse_or_prompt_file_error(line):
    args = argparse.Namespace(W=512, H=512, steps=30, scale=7.5)
    try:
        prompt = parse_gen_line(line, args, source="gen:1")
    except PromptFileError as e:
        assert str(e).startswith("gen:1: ")
        return
    check_sample_prompt(prompt, PromptDefaults(size_multiple=8, min_size=8))
    seeds = prompt.extras.get("seeds", ())
    assert all(isinstance(seed, int) for seed in seeds)
    numbers = [prompt.extras.get("negative_scale", 1.0), *prompt.extras.get("multipliers", ())]
    assert all(number == "none" or math.isfinite(number) for number in numbers)


@pytest.mark.parametrize("line", ["a cat --nl inf", "a cat --nl nan", "a cat --am 1,nan", "a cat --am -inf"])
def test_found_gen_img_non_finite_options(line):
    # were accepted: a NaN negative scale or network multiplier makes every generated pixel NaN
    args = argparse.Namespace(W=512, H=512, steps=30, scale=7.5)
    with pytest.raises(PromptFileError, match="gen:1: .*finite"):
        parse_gen_line(line, args, source="gen:1")


_JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10 ** 22, 10 ** 22),
                          st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))
_JSON = st.recursive(_JSON_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                            st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                     max_leaves=8)
_PROMPT_ENTRY = st.dictionaries(st.sampled_from(sorted(PROMPT_FILE_KEYS) + ["bogus"]),
                                st.one_of(_JSON_SCALARS, _JSON), max_size=6)


@st.composite
def prompt_files(draw):
    kind = draw(st.sampled_from([".txt", ".json", ".toml"]))
    if draw(st.integers(0, 4)) == 0:
        return kind, draw(st.binary(max_size=80))
    if kind == ".txt":
        lines = draw(st.lists(st.one_of(prompt_lines(), st.just("# comment"), st.just("")), max_size=4))
        return kind, "\n".join(lines).encode()
    entries = draw(st.lists(_PROMPT_ENTRY, max_size=3))
    if kind == ".json":
        data = draw(st.one_of(st.just(entries), _JSON))
        return kind, json.dumps(data).encode()
    table = {"prompt": {**draw(_PROMPT_ENTRY), "subset": entries}}
    data = draw(st.one_of(st.just(table), _JSON.filter(lambda d: isinstance(d, dict))))
    try:
        return kind, toml.dumps(data).encode()
    except Exception:  # the writer cannot express every structure (e.g. None in a list): raw text instead
        return kind, repr(data).encode()


@FUZZ
@given(prompt_files())
def test_prompt_files_load_or_prompt_file_error(tmp_path, case):
    suffix, data = case
    path = tmp_path / f"prompts{suffix}"
    path.write_bytes(data)
    try:
        prompts = load_prompts(path)
    except PromptFileError as e:
        assert str(path) in str(e)
        return
    assert [p.index for p in prompts] == list(range(len(prompts)))
    for p in prompts:
        check_sample_prompt(p)


# --------------------------------------------------------------------------- dataset config

_SUBSET_VALUES = {
    "num_repeats": st.integers(-2, 3), "shuffle_caption": st.booleans(),
    "caption_separator": st.sampled_from([",", ";", "", " "]), "keep_tokens": st.integers(-1, 3),
    "keep_tokens_separator": st.sampled_from(["", "|||", ","]), "secondary_separator": st.sampled_from(["", ";;;"]),
    "enable_wildcard": st.booleans(), "caption_prefix": st.text(max_size=5), "caption_suffix": st.text(max_size=5),
    "color_aug": st.booleans(), "flip_aug": st.booleans(),
    "face_crop_aug_range": st.lists(st.floats(-1, 5), min_size=2, max_size=2) | st.lists(st.floats(0, 5), max_size=3),
    "random_crop": st.booleans(),
    "token_warmup_min": st.integers(-1, 3), "token_warmup_step": st.sampled_from([0, 0.5, 2, -1]),
    "custom_attributes": st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
    "resize_interpolation": st.sampled_from(["lanczos", "area", "nearest", "cubic", "bogus"]),
    "caption_dropout_rate": st.floats(0, 1) | st.sampled_from([-0.5, 1.5, math.nan]),
    "caption_dropout_every_n_epochs": st.integers(-1, 3),
    "caption_tag_dropout_rate": st.floats(0, 1) | st.sampled_from([-0.5, 1.5, math.nan]),
    "caption_extension": st.sampled_from([".txt", "txt", ".caption", "", ".", "/x", "a/b"]),
    "class_tokens": st.text(max_size=5), "cache_info": st.booleans(),
    "is_reg": st.booleans(), "alpha_mask": st.booleans(),
}
_DATASET_VALUES = {
    "batch_size": st.integers(-1, 3),
    "resolution": st.one_of(st.integers(-8, 96), st.lists(st.integers(-8, 96), min_size=2, max_size=2),
                            st.lists(st.integers(0, 96), max_size=3)),
    "enable_bucket": st.booleans(), "min_bucket_reso": st.integers(-8, 96), "max_bucket_reso": st.integers(-8, 200),
    "bucket_reso_steps": st.integers(-1, 70), "bucket_no_upscale": st.booleans(),
    "network_multiplier": st.floats(-2, 2), "validation_seed": st.integers(0, 9),
    "validation_split": st.sampled_from([0.0, 0.0, 0.5, 0.99]) | st.floats(-0.5, 1.5),
    "resize_interpolation": st.sampled_from(["lanczos", "area", "bogus"]),
}


def _table(draw, values: dict, extra_keys: list[str], broken: bool) -> dict:
    keys = draw(st.lists(st.sampled_from(sorted(values) + (extra_keys if broken else [])), max_size=6, unique=True))
    out = {}
    for key in keys:
        strategy = values.get(key, _JSON_SCALARS)
        # in a broken config now and then a value of the wrong type: the schema must name the key
        out[key] = draw(st.one_of(strategy, _JSON_SCALARS) if broken and draw(st.booleans()) else strategy)
    return out


_GENERAL_VALUES = {k: v for k, v in {**_DATASET_VALUES, **_SUBSET_VALUES}.items() if k not in ("is_reg", "alpha_mask")}


@st.composite
def dataset_configs(draw, image_dir: str):
    """A dataset config: mostly with valid keys and value types (so that the values' combinations are
    what is fuzzed), a quarter of them broken (unknown or misplaced keys, wrong types)."""
    broken = draw(st.integers(0, 3)) == 0
    subsets = []
    for _ in range(draw(st.integers(0 if broken else 1, 2))):
        subset = _table(draw, _SUBSET_VALUES, ["num_repeat", "batch_size", "subsets"], broken)
        where = draw(st.sampled_from(["image_dir"] * 4 + ["missing", "metadata_file", "none"]))
        if where == "image_dir":
            subset["image_dir"] = image_dir
        elif where == "missing":
            subset["image_dir"] = image_dir + "/missing"
        elif where == "metadata_file":
            subset["metadata_file"] = image_dir + "/meta.json"
        subsets.append(subset)
    datasets = []
    for _ in range(draw(st.integers(0 if broken else 1, 2))):
        dataset = _table(draw, _DATASET_VALUES, ["resolutoin", "image_dir"], broken)
        if not broken:
            dataset.setdefault("resolution", draw(st.integers(16, 64)))
        dataset["subsets"] = subsets
        datasets.append(dataset)
    general = _table(draw, _GENERAL_VALUES, ["is_reg", "datasets"], broken)
    config = {"general": general, "datasets": datasets}
    if broken and draw(st.booleans()):
        config[draw(st.sampled_from(["generall", "subsets", "x"]))] = {}
    return config


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz_images")
    write_image(folder / "wide.png", (48, 24), seed=1)
    write_image(folder / "tall_100_100_50_50.png", (24, 48), seed=2, alpha=True)  # a face-suffix name
    (folder / "wide.txt").write_text("a, b ||| c, {d|e}, f", encoding="utf-8")
    (folder / "wide.caption").write_text("x, y", encoding="utf-8")
    (folder / "meta.json").write_text(json.dumps({"wide": {"caption": "m, n", "tags": "t"}}), encoding="utf-8")
    return folder


@FUZZ
@given(data=st.data())
def test_dataset_config_builds_or_dataset_error(tmp_path, image_folder, data):
    config = data.draw(dataset_configs(str(image_folder)))
    as_json = data.draw(st.booleans())
    path = tmp_path / ("dataset.json" if as_json else "dataset.toml")
    try:
        path.write_text(json.dumps(config) if as_json else toml.dumps(config), encoding="utf-8")
    except Exception:  # noqa: BLE001 - the toml writer itself crashes on some structures (None in a table)
        assume(False)  # not expressible in this format
    args = parse(dataset_config=path, seed=3, resolution=data.draw(st.sampled_from([None, None, "32", "32,40", "x"])))
    try:
        train, _validation = build_dataset_group(args)
    except DatasetError as e:
        assert str(e)
        event("DatasetError: " + str(e).split(": ")[-1][:40])
        return
    event("built")
    assert len(train) > 0
    for index in range(min(len(train), 2)):
        batch = train[index]
        assert all(isinstance(c, str) for c in batch["captions"])
        images = batch["images"]
        assert images.ndim == 4 and images.shape[0] == len(batch["captions"]) and torch.isfinite(images).all()


@FUZZ
@given(st.one_of(st.binary(max_size=120), MARKUP.map(str.encode),
                 st.text(alphabet="[]=\"'.,{}abc123 \n#", max_size=60).map(str.encode)), st.booleans())
def test_dataset_config_text_parses_or_dataset_error(tmp_path, data, as_json):
    path = tmp_path / ("d.json" if as_json else "d.toml")
    path.write_bytes(data)
    try:
        config = load_config_file(path)
    except DatasetError as e:
        assert str(path) in str(e)
        return
    assert isinstance(config, dict)


# ----------------------------------------------------------------------------- --config_file

_PARSER = setup_network_parser()
_ACTIONS = {a.dest: a for a in _PARSER._actions if a.dest not in ("help", "config_file", "output_config")}
_CONFIG_VALUES = st.one_of(_JSON_SCALARS.filter(lambda v: v is not None),
                           st.lists(st.one_of(st.integers(-5, 5), st.text(max_size=4)), max_size=3),
                           st.sampled_from(["fp16", "no", "cosine", "AdamW", "l2", "3", "0.5", "true"]))


@st.composite
def config_tables(draw):
    keys = draw(st.lists(st.sampled_from(sorted(_ACTIONS) + ["network_dims", "lerning_rate"]), max_size=5,
                         unique=True))
    flat = {key: draw(_CONFIG_VALUES) for key in keys}
    if flat and draw(st.booleans()):
        return {"section": flat}
    return flat


def _well_typed(action: argparse.Action, value) -> bool:
    if isinstance(action, argparse._StoreTrueAction):
        return isinstance(value, bool)
    if action.nargs in ("*", "+") or isinstance(action.nargs, int):
        return isinstance(value, list) and (action.type is None or all(isinstance(v, action.type) for v in value))
    if action.type in (int, float, str):
        return isinstance(value, action.type) and not isinstance(value, bool)
    return True


@FUZZ
@given(config_tables())
def test_config_file_parses_or_clean_error(tmp_path, capsys, table):
    path = tmp_path / "args.toml"
    try:
        path.write_text(toml.dumps(table), encoding="utf-8")
    except Exception:
        assume(False)
    try:
        args = parse_args_with_config(setup_network_parser(), ["--config_file", str(path)])
    except SystemExit as e:  # argparse's parser.error / ArgumentError: exit status 2 and a message
        assert e.code == 2 or (isinstance(e.code, str) and e.code)
        assert capsys.readouterr().err.strip() or isinstance(e.code, str)
        return
    flat = table.get("section", table) if set(table) == {"section"} else table
    for key in flat:
        value = getattr(args, key)
        action = _ACTIONS[key]
        assert _well_typed(action, value), (key, value, action)
        if action.choices is not None:
            assert value in action.choices


@FUZZ
@given(st.one_of(st.binary(max_size=100), st.text(alphabet="[]=\"'.,{}abc_123 \n#", max_size=60).map(str.encode)))
def test_config_file_text_parses_or_clean_error(tmp_path, capsys, data):
    path = tmp_path / "args.toml"
    path.write_bytes(data)
    try:
        parse_args_with_config(setup_network_parser(), ["--config_file", str(path)])
    except SystemExit as e:
        assert e.code == 2
        assert str(path) in capsys.readouterr().err


# ------------------------------------------------------------------- crashes found, kept as cases

@pytest.mark.parametrize("suffix, data", [
    (".txt", b"a cat \x80"),  # was UnicodeDecodeError
    (".toml", b'[prompt]\ncfg_trunc_ratio = [ "None", false,]\n'),  # was IndexError inside the toml package
    (".json", b'[{"prompt": "a", "scale": NaN}]'),  # was accepted: every sampled pixel NaN
    (".txt", b"a cat --l inf"),
])
def test_found_prompt_file_crashes(tmp_path, suffix, data):
    path = tmp_path / f"p{suffix}"
    path.write_bytes(data)
    with pytest.raises(PromptFileError, match=str(path)):
        load_prompts(path)


def test_found_layer_norm_rescale_noise():
    # An encoder ending in a LayerNorm gives a mean that is float noise: "original" scaled the prompt
    # by noise / noise (0.75 for this seed; any factor, even negative, for others).
    hidden = torch.nn.functional.layer_norm(torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(0)), (32,))
    weights = torch.ones(1, 77)
    weights[0, 2], weights[0, 3] = 1.5, 0.5
    torch.testing.assert_close(apply_token_weights(hidden, weights), hidden * weights[..., None])


@pytest.mark.parametrize("text, problem", [
    (b"network_dim = 8\n\x80", "not UTF-8"),  # was UnicodeDecodeError
    (b'a = [ "x", false,]', "not valid TOML"),  # was IndexError inside the toml package
    (b"noise_offset = true", "expected a number"),  # was kept as the bool True
    (b"network_dim = [4, 8]", "not a list"),  # was kept as a list
    (b"network_dim = 8.5", "expected an integer"),  # was silently 8
    (b'cache_latents = "yes"', "expected true or false"),  # was the truthy string "yes"
])
def test_found_config_file_crashes(tmp_path, capsys, text, problem):
    path = tmp_path / "args.toml"
    path.write_bytes(text)
    with pytest.raises(SystemExit) as info:
        parse_args_with_config(setup_network_parser(), ["--config_file", str(path)])
    assert info.value.code == 2
    assert problem in capsys.readouterr().err


def test_config_file_single_value_for_a_list_flag(tmp_path):
    path = tmp_path / "args.toml"
    path.write_text('optimizer_args = "weight_decay=0.1"\ntext_encoder_lr = 1\n')
    args = parse_args_with_config(setup_network_parser(), ["--config_file", str(path)])
    assert args.optimizer_args == ["weight_decay=0.1"] and args.text_encoder_lr == [1.0]


@pytest.mark.parametrize("subset_line, problem", [
    ('caption_separator = ""', "caption_separator must not be empty"),  # was ValueError: empty separator
    ("face_crop_aug_range = [0.0, 0.0]", "face_crop_aug_range must be [min, max]"),  # was ZeroDivisionError
    ('caption_extension = "/x"', "caption_extension must be a file extension"),  # was ValueError: Invalid name
    ("face_crop_aug_range = [1.0]", "expected two numbers [min, max]"),  # the message was "None"
])
def test_found_dataset_config_crashes(tmp_path, image_folder, subset_line, problem):
    path = tmp_path / "dataset.toml"
    path.write_text(f'[[datasets]]\nresolution = 32\n[[datasets.subsets]]\nimage_dir = "{image_folder.as_posix()}"\n'
                    f"{subset_line}\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=re.escape(problem)):
        build_dataset_group(parse(dataset_config=path, seed=1))
