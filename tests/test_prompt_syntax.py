"""Prompt syntax for generation: A1111 weights + BREAK, dynamic prompts, and long/weighted prompt encoding."""

from __future__ import annotations

import logging
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import CLIPTextConfig, CLIPTextModel

from library.families.sd import text
from library.families.sd.tokenizer import load_clip_tokenizer
from library.generation import prompt_encoding
from library.generation.dynamic_prompts import expand_dynamic_prompt
from library.generation.prompt_encoding import encode_prompts, tokens_and_weights
from library.prompt_weights import BREAK_SEGMENT, apply_token_weights, is_break, parse_prompt_weights
from library.training.weighted_captions import parse_weighted_caption

BOS, EOS = 49406, 49407
R, S = 1.1, 1 / 1.1


def assert_segments(got, expected):
    assert [s for s, _ in got] == [s for s, _ in expected]
    for (_, w), (_, e) in zip(got, expected):
        assert w == pytest.approx(e)


# --------------------------------------------------------------------------- weights parser
@pytest.mark.parametrize("prompt, expected", [
    (r"(a:1.3) [b] ((c)) \(d\) BREAK e",
     [("a", 1.3), (" ", 1), ("b", S), (" ", 1), ("c", R * R), (" (d) ", 1), BREAK_SEGMENT, (" e", 1)]),
    ("plain text", [("plain text", 1)]),
    ("", [("", 1)]),
    ("()", [("", 1)]),
    ("(((x)))", [("x", R ** 3)]),
    ("[[x]]", [("x", S * S)]),
    ("([x])", [("x", 1)]),
    ("((x):2)", [("x", R * 2)]),
    ("(a (b:0.5) c)", [("a ", R), ("b", 0.5 * R), (" c", R)]),
    ("(x: 1.5 )", [("x", 1.5)]),
    ("(x:.5)", [("x", 0.5)]),
    ("(x:-1)", [("x", -1)]),
    # malformed: degrades to literal text
    ("a) b] c", [("a) b] c", 1)]),
    ("x (y", [("x ", 1), ("y", R)]),
    ("x [y", [("x ", 1), ("y", S)]),
    ("(a:b)", [("a:b", R)]),
    ("a:1.3)", [("a:1.3)", 1)]),
    ("(a:1.3", [("a:1.3", R)]),
    ("(a:1.3.4)", [("a:1.3.4", R)]),
    ("(a:)", [("a:", R)]),
    ("::", [("::", 1)]),
    (r"\\(x)", [("\\", 1), ("x", R)]),
    (r"a\b \q", [(r"a\b \q", 1)]),
    ("trailing\\", [("trailing\\", 1)]),
    (r"\[x\]", [("[x]", 1)]),
    # BREAK only as an upper-case separate word; never weighted
    ("a BREAK b", [("a ", 1), BREAK_SEGMENT, (" b", 1)]),
    ("aBREAK BREAKb break Break", [("aBREAK BREAKb break Break", 1)]),
    ("BREAK", [BREAK_SEGMENT]),
    ("(a BREAK b)", [("a ", R), BREAK_SEGMENT, (" b", R)]),
    ("(BREAK:2),BREAK_x", [BREAK_SEGMENT, (",BREAK_x", 1)]),
    ("BREAK BREAK", [BREAK_SEGMENT, (" ", 1), BREAK_SEGMENT]),
])
def test_parse_prompt_weights(prompt, expected):
    assert_segments(parse_prompt_weights(prompt), expected)


def test_break_marker_and_training_captions():
    assert is_break(BREAK_SEGMENT) and not is_break(("BREAK", 1.0))
    # training captions keep BREAK as text, and use the same parser otherwise
    assert parse_weighted_caption("a BREAK b") == [("a BREAK b", 1.0)]
    assert parse_weighted_caption("(a:1.3) b") == parse_prompt_weights("(a:1.3) b")


def test_huge_explicit_weight_is_literal():
    prompt = "(x:" + "9" * 400 + ")"
    got = parse_prompt_weights(prompt)
    assert "".join(s for s, _ in got) == "x:" + "9" * 400


@st.composite
def weighted_markup(draw, depth=0):
    """A well-formed prompt: (markup, [(char or "BREAK", weight or None for BREAK)])."""
    kinds = ["text", "escape", "break"] + (["round", "square", "explicit"] if depth < 3 else [])
    parts = []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(kinds))
        if kind == "text":
            s = draw(st.text(alphabet="abc xyz,.0123", min_size=1, max_size=6))
            parts.append((s, [(c, 1.0) for c in s]))
        elif kind == "escape":
            c = draw(st.sampled_from("()[]\\"))
            parts.append(("\\" + c, [(c, 1.0)]))
        elif kind == "break":
            parts.append((" BREAK ", [(" ", 1.0), ("BREAK", None), (" ", 1.0)]))
        else:
            inner, items = draw(weighted_markup(depth + 1))
            if kind == "round":
                markup, factor = f"({inner})", R
            elif kind == "square":
                markup, factor = f"[{inner}]", S
            else:
                factor = draw(st.sampled_from([0.5, 1.3, 2.0, 0.25, 1.0]))
                markup = f"({inner}:{factor})"
            parts.append((markup, [(c, None if w is None else w * factor) for c, w in items]))
    return "".join(m for m, _ in parts), [item for _, items in parts for item in items]


def _per_char(segments):
    out = []
    for segment in segments:
        if is_break(segment):
            out.append(("BREAK", None))
        else:
            out.extend((c, segment[1]) for c in segment[0])
    return out


@settings(max_examples=300, deadline=None, database=None)
@given(weighted_markup())
def test_well_formed_markup_roundtrip(case):
    markup, expected = case
    got = _per_char(parse_prompt_weights(markup))
    assert [c for c, _ in got] == [c for c, _ in expected]
    for (_, w), (_, e) in zip(got, expected):
        if e is None:
            assert w is None
        else:
            assert w == pytest.approx(e, rel=1e-9) and w > 0


@settings(max_examples=500, deadline=None, database=None)
@given(st.text(max_size=80))
def test_arbitrary_text_never_raises(prompt):
    segments = parse_prompt_weights(prompt)
    assert segments and all(isinstance(s, str) and isinstance(w, float) for s, w in segments)
    if ":" not in prompt:  # without explicit weights every weight is 1.1**k
        assert all(w > 0 for seg in segments if not is_break(seg) for _, w in [seg])
    for expanded in expand_dynamic_prompt(prompt, random.Random(0)):
        parse_prompt_weights(expanded)


@settings(max_examples=300, deadline=None, database=None)
@given(st.text(alphabet="ab ()[]:\\1.5-BREAK", max_size=40))
def test_markup_heavy_text_never_raises(prompt):
    segments = parse_prompt_weights(prompt)
    plain = "".join(s for s, _ in segments)
    assert len(plain) <= len(prompt)


# --------------------------------------------------------------------------- dynamic prompts
def test_plain_prompt_is_unchanged():
    assert expand_dynamic_prompt("a (cat:1.2), BREAK dog | x", random.Random(0)) == ["a (cat:1.2), BREAK dog | x"]


def test_seeded_choice():
    results = {expand_dynamic_prompt("a {red|green|blue} ball", random.Random(seed))[0] for seed in range(40)}
    assert results == {"a red ball", "a green ball", "a blue ball"}
    for seed in range(5):
        assert (expand_dynamic_prompt("{a|b|c} {d|e|f}", random.Random(seed))
                == expand_dynamic_prompt("{a|b|c} {d|e|f}", random.Random(seed)))


def test_enumerate_product_in_order():
    got = expand_dynamic_prompt("{e$$a|b} x {e$$1|2|3}", random.Random(0))
    assert got == ["a x 1", "a x 2", "a x 3", "b x 1", "b x 2", "b x 3"]
    assert expand_dynamic_prompt("{ e $$a|b}", random.Random(0)) == ["a", "b"]


def test_enumerate_shares_random_choices():
    for seed in range(10):
        got = expand_dynamic_prompt("{e$$a|b} {x|y}", random.Random(seed))
        assert len(got) == 2 and got[0][2:] == got[1][2:]


def test_choose_n():
    for seed in range(20):
        (got,) = expand_dynamic_prompt("{2$$a|b|c|d}", random.Random(seed))
        parts = got.split(", ")
        assert len(parts) == 2 and len(set(parts)) == 2 and set(parts) <= set("abcd")
    assert sorted(expand_dynamic_prompt("{9$$a|b|c}", random.Random(0))[0].split(", ")) == ["a", "b", "c"]
    assert expand_dynamic_prompt("x{0$$a|b}y", random.Random(0)) == ["xy"]


def test_choose_range():
    counts = set()
    for seed in range(60):
        (got,) = expand_dynamic_prompt("{1-3$$a|b|c|d}", random.Random(seed))
        parts = got.split(", ")
        assert len(set(parts)) == len(parts)
        counts.add(len(parts))
    assert counts == {1, 2, 3}
    upper = {len(expand_dynamic_prompt("{2-$$a|b|c}", random.Random(s))[0].split(", ")) for s in range(40)}
    assert upper == {2, 3}
    lower = {len(expand_dynamic_prompt("{-2$$a|b|c}", random.Random(s))[0].split(", ")) for s in range(40)}
    assert lower == {1, 2}
    swapped = {len(expand_dynamic_prompt("{3-2$$a|b|c}", random.Random(s))[0].split(", ")) for s in range(40)}
    assert swapped == {2, 3}


def test_custom_separator():
    (got,) = expand_dynamic_prompt("{3$$ and $$a|b|c}", random.Random(1))
    assert sorted(got.split(" and ")) == ["a", "b", "c"]
    (got,) = expand_dynamic_prompt("{2-2$$-$$a|b}", random.Random(1))
    assert got in ("a-b", "b-a")
    assert expand_dynamic_prompt("{$$ + $$a}", random.Random(0)) == ["a"]


def test_nested_groups_and_escapes():
    assert sorted(expand_dynamic_prompt("{e$$a|{e$$b|c}}", random.Random(0))) == ["a", "b", "c"]
    assert expand_dynamic_prompt(r"\{x\|y\} \(z\) \\", random.Random(0)) == [r"{x|y} \(z\) \\"]
    assert expand_dynamic_prompt(r"{a\|b}", random.Random(0)) == ["a|b"]
    assert expand_dynamic_prompt(r"{e$$\}|\{}", random.Random(0)) == ["}", "{"]


def test_absurd_nesting_is_literal():
    prompt = "{" * 3000 + "a" + "}" * 3000
    assert expand_dynamic_prompt(prompt, random.Random(0)) == [prompt]
    assert expand_dynamic_prompt("{" * 20 + "a|b" + "}" * 20, random.Random(0))[0] in ("a", "b")
    assert "".join(s for s, _ in parse_prompt_weights("(" * 3000 + "a" + ")" * 3000)) == "a"


@pytest.mark.parametrize("prompt, expected", [
    ("{a|b", ["{a|b"]),
    ("a}b", ["a}b"]),
    ("{x$$a|b}", ["{x$$a|b}"]),
    ("{$$sep}", ["{$$sep}"]),
    ("{x$${e$$a|b}}", ["{x$$a}", "{x$$b}"]),
    ("{}", [""]),
    ("{a|}", None),
])
def test_malformed_dynamic_prompts(prompt, expected):
    got = expand_dynamic_prompt(prompt, random.Random(0))
    if expected is None:
        assert got in (["a"], [""])
    else:
        assert got == expected


@settings(max_examples=300, deadline=None, database=None)
@given(st.text(alphabet="ab{}|$e12-\\ ", max_size=30), st.integers(0, 2 ** 32))
def test_dynamic_fuzz(prompt, seed):
    got = expand_dynamic_prompt(prompt, random.Random(seed))
    assert got and all(isinstance(p, str) for p in got)
    if not set(prompt) & set("{}\\"):
        assert got == [prompt]


# --------------------------------------------------------------------------- encoding
@pytest.fixture(scope="module")
def tok():
    return load_clip_tokenizer(v2=False)


@pytest.fixture(scope="module")
def te():
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                            num_attention_heads=2, max_position_embeddings=77, bos_token_id=BOS,
                            eos_token_id=EOS, pad_token_id=EOS)
    return CLIPTextModel(config).eval()


def plain_encode(tok, te, prompts, max_token_length=None, clip_skip=None):
    with torch.no_grad():
        return text.encode(te, text.tokenize(tok, prompts, max_token_length), clip_skip=clip_skip)


def test_tokens_and_weights(tok):
    ids, weights = tokens_and_weights(tok, r"(a:1.3) [b] ((c)) \(d\) BREAK e")
    abcd = tok(["a", "b", "c", "(d)", "e"], add_special_tokens=False).input_ids
    n_text = sum(len(x) for x in abcd[:4])
    assert ids[:n_text] == [t for x in abcd[:4] for t in x]
    assert ids[n_text:75] == [EOS] * (75 - n_text) and ids[75:] == abcd[4]
    assert weights[:3] == pytest.approx([1.3, S, R * R]) and set(weights[3:]) == {1.0}
    assert tokens_and_weights(tok, "") == ([], [])
    assert tokens_and_weights(tok, "BREAK BREAK x") == tokens_and_weights(tok, "x")


def test_break_fill_sd2():
    tok2 = load_clip_tokenizer(v2=True)
    ids, _ = tokens_and_weights(tok2, "a cat BREAK dog")
    assert len(ids) == 76 and ids[2] == EOS and ids[3:75] == [tok2.pad_token_id] * 72


@pytest.mark.parametrize("clip_skip", [None, 2])
def test_unweighted_equals_plain_encode(tok, te, clip_skip):
    prompts = ["a photo of a cat", "a red fox, snowy forest"]
    got = encode_prompts(tok, te, prompts, max_embeddings_multiples=3, clip_skip=clip_skip)
    assert got.shape == (2, 77, 32)
    torch.testing.assert_close(got, plain_encode(tok, te, prompts, clip_skip=clip_skip), rtol=0, atol=0)


def test_long_prompt_two_chunks(tok, te, caplog, monkeypatch):
    prompt = "cat " * 100
    assert len(tokens_and_weights(tok, prompt)[0]) == 100
    got = encode_prompts(tok, te, [prompt], max_embeddings_multiples=3)
    assert got.shape == (1, 152, 32)
    torch.testing.assert_close(got, plain_encode(tok, te, [prompt], 150), rtol=0, atol=0)

    monkeypatch.setattr(prompt_encoding, "_warned_truncation", False)
    with caplog.at_level(logging.WARNING):
        short = encode_prompts(tok, te, [prompt])  # None -> one chunk, truncated
        encode_prompts(tok, te, [prompt])
    assert short.shape == (1, 77, 32)
    torch.testing.assert_close(short, plain_encode(tok, te, [prompt]), rtol=0, atol=0)
    assert sum("longer than 75 tokens" in r.message for r in caplog.records) == 1
    assert encode_prompts(tok, te, ["cat " * 400], max_embeddings_multiples=3).shape == (1, 227, 32)


def test_break_forces_chunk_boundary(tok, te):
    got = encode_prompts(tok, te, ["a cat BREAK a dog"], max_embeddings_multiples=3)
    assert got.shape == (1, 152, 32)
    cat, dog = plain_encode(tok, te, ["a cat", "a dog"])
    torch.testing.assert_close(got[0, :76], cat[:76])
    torch.testing.assert_close(got[0, 76:151], dog[1:76])
    # with one chunk allowed the BREAK part is cut off
    torch.testing.assert_close(encode_prompts(tok, te, ["a cat BREAK a dog"])[0], cat)


def test_cond_uncond_same_length(tok, te):
    got = encode_prompts(tok, te, ["cat " * 100, ""], max_embeddings_multiples=3)
    assert got.shape == (2, 152, 32)
    empty = plain_encode(tok, te, [""])[0]
    torch.testing.assert_close(got[1, :76], empty[:76])
    torch.testing.assert_close(got[1, 76:151], empty[1:76])  # the extra chunk is an empty-prompt chunk


def test_weight_scales_only_its_token(tok, te):
    base = encode_prompts(tok, te, ["a cat sitting"], emb_normalize_mode="none")
    weighted = encode_prompts(tok, te, ["a (cat:1.5) sitting"], emb_normalize_mode="none")
    torch.testing.assert_close(weighted[0, 2], 1.5 * base[0, 2])
    others = [i for i in range(77) if i != 2]
    torch.testing.assert_close(weighted[0, others], base[0, others], rtol=0, atol=0)

    original = encode_prompts(tok, te, ["a (cat:1.5) sitting"])
    # The encoder ends in a LayerNorm, so the overall mean is float noise around 0: compare it on the
    # scale of the values, and check that "original" is one common rescaling of the weighted output.
    scale = base.abs().mean().item()
    assert abs(original.mean().item() - base.mean().item()) <= 1e-5 * scale
    ratio = original[0] / weighted[0]
    torch.testing.assert_close(ratio, torch.full_like(ratio, ratio[0, 0].item()))
    absolute = encode_prompts(tok, te, ["a (cat:1.5) sitting"], emb_normalize_mode="abs")
    assert absolute.abs().mean().item() == pytest.approx(base.abs().mean().item(), rel=1e-4)


def test_apply_token_weights_modes():
    hidden = torch.randn(2, 5, 3)
    weights = torch.tensor([[1, 2.0, 1, 1, 1], [1, 1, 1, 1, 1]])
    none = apply_token_weights(hidden, weights, "none")
    torch.testing.assert_close(none, hidden * weights[..., None])
    torch.testing.assert_close(apply_token_weights(hidden, torch.ones(2, 5), "original"), hidden, rtol=0, atol=0)
    assert torch.isfinite(apply_token_weights(torch.zeros(1, 2, 3), torch.ones(1, 2), "abs")).all()
    with pytest.raises(ValueError):
        apply_token_weights(hidden, weights, "bogus")


def test_encode_prompts_rejects_bad_arguments(tok, te):
    with pytest.raises(ValueError):
        encode_prompts(tok, te, [])
    with pytest.raises(ValueError):
        encode_prompts(tok, te, ["x"], max_embeddings_multiples=0)
    with pytest.raises(ValueError):
        encode_prompts(tok, te, ["x"], emb_normalize_mode="mean")
