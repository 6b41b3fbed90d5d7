"""Caption reading and per-sample processing, each checked against an independently computed result."""

from __future__ import annotations

import random

import pytest

from library.data.captions import (CaptionOptions, TrainingPosition, expand_wildcards, process_caption,
                                   read_caption_file, tag_frequency)
from library.data.errors import DatasetError

POS = TrainingPosition(epoch=1, step=0, max_train_steps=100)


def run(caption: str, seed: int = 0, pos: TrainingPosition = POS, **opts) -> str:
    return process_caption(caption, CaptionOptions(**opts), random.Random(seed), pos)


def test_read_caption_file(tmp_path):
    p = tmp_path / "a.caption"
    p.write_text("\n  first line  \nsecond\n\n", encoding="utf-8")
    assert read_caption_file(p) == "first line"
    assert read_caption_file(p, enable_wildcard=True) == "first line\nsecond"
    p.write_bytes("\ufeffbom".encode("utf-8"))
    assert read_caption_file(p) == "bom"


def test_bad_caption_files_name_the_file(tmp_path):
    latin = tmp_path / "latin.caption"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"latin\.caption is not UTF-8"):
        read_caption_file(latin)
    empty = tmp_path / "empty.caption"
    empty.write_text("  \n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"empty\.caption is empty"):
        read_caption_file(empty)


def test_prefix_suffix_and_unchanged_without_options():
    assert run("a, b") == "a, b"
    assert run("a, b", caption_prefix="pre", caption_suffix="post") == "pre a, b post"


def test_caption_dropout_rate_and_epochs():
    assert run("a, b", caption_dropout_rate=1.0, caption_prefix="pre") == ""  # prefix is dropped too
    # rate 0.5: dropped exactly when the first draw of the same seed is below 0.5
    for seed in range(20):
        expected = "" if random.Random(seed).random() < 0.5 else "a, b"
        assert run("a, b", seed=seed, caption_dropout_rate=0.5) == expected
    opts = dict(caption_dropout_every_n_epochs=2)
    assert run("a", pos=TrainingPosition(epoch=1), **opts) == "a"
    assert run("a", pos=TrainingPosition(epoch=2), **opts) == ""
    assert run("a", pos=TrainingPosition(epoch=4), **opts) == ""


def test_wildcards_and_escapes():
    for seed in range(10):
        rng = random.Random(seed)
        first = rng.choice(["red", "blue", "green"])
        second = rng.choice(["cat", "dog"])
        got = expand_wildcards("{red|blue|green} {cat|dog} {{literal}}", random.Random(seed))
        assert got == f"{first} {second} {{literal}}"
    assert run("{a|b}", enable_wildcard=False) == "{a|b}"  # only with enable_wildcard


def test_multiline_caption_picks_one_line_with_prefix():
    caption = "one {x|y}\ntwo\nthree"
    for seed in range(10):
        rng = random.Random(seed)
        line = rng.choice(["p one {x|y}", "p two", "p three"])
        expected = line.replace("{x|y}", rng.choice(["x", "y"])) if "{" in line else line
        assert run(caption, seed=seed, enable_wildcard=True, caption_prefix="p") == expected


def test_shuffle_keeps_first_tokens():
    tags = [f"t{i}" for i in range(8)]
    for seed in range(5):
        flex = tags[2:]
        random.Random(seed).shuffle(flex)
        assert run(", ".join(tags), seed=seed, shuffle_caption=True, keep_tokens=2) == ", ".join(tags[:2] + flex)


def test_keep_tokens_separator_fixed_flex_and_suffix():
    caption = "a, b ||| c, d, e ||| z, y"
    for seed in range(5):
        flex = ["c", "d", "e"]
        random.Random(seed).shuffle(flex)
        got = run(caption, seed=seed, shuffle_caption=True, keep_tokens_separator="|||", keep_tokens=5)
        assert got == ", ".join(["a", "b", *flex, "z", "y"])
    # the marker never reaches the text encoder, even without shuffling
    assert run("a ||| b, c", keep_tokens_separator="|||") == "a, b, c"


def test_tag_dropout_draws_per_flexible_tag():
    tags = ["k", "a", "b", "c", "d", "e"]
    for seed in range(10):
        rng = random.Random(seed)
        kept = [t for t in tags[1:] if rng.random() >= 0.5]
        assert run(", ".join(tags), seed=seed, keep_tokens=1, caption_tag_dropout_rate=0.5) == ", ".join(["k", *kept])
    assert run("k, a, b", keep_tokens=1, caption_tag_dropout_rate=1.0) == "k"


def test_token_warmup():
    caption = "k, a, b, c, d, e, f, g, h, i, j"  # 1 fixed + 10 flexible
    opts = dict(keep_tokens=1, token_warmup_min=2, token_warmup_step=10)
    # 2 tags at step 0, growing by (10 - 2) / 10 per step, all from step 10 on
    assert run(caption, pos=TrainingPosition(step=0), **opts) == "k, a, b"
    assert run(caption, pos=TrainingPosition(step=5), **opts) == "k, a, b, c, d, e, f"  # 2 + floor(5 * 0.8) = 6
    assert run(caption, pos=TrainingPosition(step=10), **opts) == caption
    # a value below 1 is a fraction of max_train_steps: 0.5 * 40 = 20 steps
    frac = dict(keep_tokens=1, token_warmup_min=2, token_warmup_step=0.5)
    assert run(caption, pos=TrainingPosition(step=10, max_train_steps=40), **frac) == "k, a, b, c, d, e, f"


def test_secondary_separator_groups_move_together():
    caption = "a;;;b, c, d;;;e"
    for seed in range(5):
        flex = ["a;;;b", "c", "d;;;e"]
        random.Random(seed).shuffle(flex)
        expected = ", ".join(flex).replace(";;;", ",")
        assert run(caption, seed=seed, shuffle_caption=True, secondary_separator=";;;") == expected


def test_replacements_apply_last():
    out = process_caption("sks dog", CaptionOptions(caption_prefix="x"), random.Random(0), POS, {"sks": "<t1> <t2>"})
    assert out == "x <t1> <t2> dog"


def test_tag_frequency_counts_per_caption():
    assert tag_frequency(["sks, a red box", "sks, blue", "sks"]) == {"sks": 3, "a red box": 1, "blue": 1}
    assert tag_frequency(["a;b"], separator=";") == {"a": 1, "b": 1}
