"""A1111-style attention weights in prompts and captions: the one parser, and how weights are applied.

Used by ``--weighted_captions`` (training, :mod:`library.training.weighted_captions`) and by prompt
encoding for generation (:mod:`library.generation.prompt_encoding`).

Syntax (:func:`parse_prompt_weights`), scanned left to right:

* ``(text)`` multiplies the weight of ``text`` by 1.1; nesting multiplies, so ``((text))`` is 1.1**2;
* ``[text]`` divides the weight by 1.1 (``[[text]]``: 1.1**-2);
* ``(text:1.3)`` multiplies the weight by 1.3 instead of 1.1. The number is ``[+-]digits[.digits]`` or
  ``.digits``, spaces allowed around it, and must be followed by ``)``; ``((a):2)`` is 1.1 * 2 for ``a``;
* ``\\(``, ``\\)``, ``\\[``, ``\\]``, ``\\\\`` are the literal characters; any other backslash is literal text;
* ``BREAK`` (upper case, as a separate word: the characters before and after it are not letters,
  digits or ``_``) is returned as the :data:`BREAK_SEGMENT` marker ``("BREAK", -1.0)`` instead of
  text (only when ``breaks=True``, the default; training captions use ``breaks=False``). Brackets
  around it do not change the marker's weight. The whitespace around it stays in the neighbouring
  text segments.

Malformed input never raises; it degrades to literal text:

* a ``)`` or ``]`` with no open bracket of its kind is literal text (so is a ``)`` whose 1.1 would
  overflow the weights inside it, after an explicit weight near the float limit);
* a ``(`` or ``[`` that is never closed applies its factor (1.1 or 1/1.1) to the rest of the text;
* a ``:`` that is not an explicit weight as described above (outside round brackets, no number, no
  ``)`` after the number, a number that does not fit a finite float, or one whose product with the
  enclosing weights would not) is literal text; so every weight returned is finite.

Segments: neighbouring pieces with equal weight are merged, markers never; text with no
characters left (empty input, or only brackets) gives ``[("", 1.0)]``. Joining the segment texts
(the marker read as ``"BREAK"``) gives the input with the markup removed.
"""

from __future__ import annotations

import math
import re

import torch

ROUND = 1.1
SQUARE = 1 / 1.1
BREAK = "BREAK"
BREAK_SEGMENT: tuple[str, float] = (BREAK, -1.0)
"""The segment :func:`parse_prompt_weights` returns for ``BREAK``; test with :func:`is_break`."""
EMB_NORMALIZE_MODES = ("original", "abs", "none")

_EXPLICIT = re.compile(r":\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)")
_ESCAPABLE = "()[]\\"
# A mean below this fraction of the mean absolute value is float32 rounding noise (the error of a
# sum of ~60k values is ~1e-5 of their magnitude), not a level worth preserving.
_NOISE = 1e-4


def _is_word_char(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def _break_at(text: str, i: int) -> bool:
    end = i + len(BREAK)
    return (text.startswith(BREAK, i)
            and (i == 0 or not _is_word_char(text[i - 1]))
            and (end == len(text) or not _is_word_char(text[end])))


def is_break(segment: tuple[str, float]) -> bool:
    """Whether a segment from :func:`parse_prompt_weights` is the ``BREAK`` marker."""
    return segment == BREAK_SEGMENT


def parse_prompt_weights(text: str, *, breaks: bool = True) -> list[tuple[str, float]]:
    """``"a (b:1.3) [c] BREAK d"`` -> ``[("a ", 1.0), ("b", 1.3), (" ", 1.0), ("c", 1/1.1),
    (" ", 1.0), ("BREAK", -1.0), (" d", 1.0)]``; the rules are in the module docstring."""
    pieces: list[list] = []  # [text, weight, is_marker]; weights multiplied in place when a bracket closes
    open_round: list[int] = []
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if not piece[2]:
                piece[1] *= factor

    def fits(start: int, factor: float) -> bool:
        return all(math.isfinite(piece[1] * factor) for piece in pieces[start:] if not piece[2])

    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] in _ESCAPABLE:
            pieces.append([text[i + 1], 1.0, False])
            i += 2
            continue
        if breaks and ch == "B" and _break_at(text, i):
            pieces.append([BREAK, BREAK_SEGMENT[1], True])
            i += len(BREAK)
            continue
        if ch == ":" and open_round and (m := _EXPLICIT.match(text, i)):
            factor = float(m.group(1))
            if math.isfinite(factor) and fits(open_round[-1], factor):
                scale(open_round.pop(), factor)
                i = m.end()
                continue
        if ch == "(":
            open_round.append(len(pieces))
        elif ch == "[":
            open_square.append(len(pieces))
        elif ch == ")" and open_round and fits(open_round[-1], ROUND):
            scale(open_round.pop(), ROUND)
        elif ch == "]" and open_square:
            scale(open_square.pop(), SQUARE)
        else:
            pieces.append([ch, 1.0, False])
        i += 1
    for start in open_round:
        if fits(start, ROUND):
            scale(start, ROUND)
    for start in open_square:
        scale(start, SQUARE)

    merged: list[tuple[str, float]] = []
    last_was_marker = True
    for piece_text, weight, marker in pieces:
        if marker:
            merged.append(BREAK_SEGMENT)
        elif merged and not last_was_marker and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + piece_text, weight)
        else:
            merged.append((piece_text, weight))
        last_was_marker = marker
    return merged or [("", 1.0)]


def apply_token_weights(hidden: torch.Tensor, weights: torch.Tensor, mode: str = "original") -> torch.Tensor:
    """Text-encoder output ``hidden [B,T,D]`` scaled per token by ``weights [B,T]``, then renormalised.

    ``h' = h * w[:, :, None]``, then for each prompt separately (means over all its tokens and channels):

    * ``original``: ``h'' = h' * mean(h) / mean(h')`` (the overall mean stays what the encoder gave);
    * ``abs``: ``h'' = h' * mean(|h|) / mean(|h'|)``;
    * ``none``: ``h'' = h'``.

    A prompt is not rescaled when the ratio would be meaningless: ``mean(h')`` (or ``mean(|h'|)``)
    is 0, the ratio is not finite, or (``original``) ``mean(h)`` or ``mean(h')`` is rounding noise,
    below ``1e-4`` times the mean absolute value -- what an encoder ending in a LayerNorm gives,
    where noise / noise would scale the prompt by an arbitrary factor, even flip its sign.
    Computed in float32, returned in ``hidden``'s dtype.
    """
    if mode not in EMB_NORMALIZE_MODES:
        raise ValueError(f"emb_normalize_mode must be one of {EMB_NORMALIZE_MODES}, got {mode!r}")
    weights = weights.to(device=hidden.device, dtype=torch.float32)
    h = hidden.float()
    scaled = h * weights.unsqueeze(-1)
    if mode == "none":
        return scaled.to(hidden.dtype)
    if mode == "abs":
        before = h.abs().mean(dim=(1, 2), keepdim=True)
        after = scaled.abs().mean(dim=(1, 2), keepdim=True)
        meaningful = after > 0
    else:
        before = h.mean(dim=(1, 2), keepdim=True)
        after = scaled.mean(dim=(1, 2), keepdim=True)
        meaningful = ((before.abs() > _NOISE * h.abs().mean(dim=(1, 2), keepdim=True))
                      & (after.abs() > _NOISE * scaled.abs().mean(dim=(1, 2), keepdim=True)))
    ratio = before / torch.where(meaningful, after, torch.ones_like(after))
    ratio = torch.where(meaningful & torch.isfinite(ratio), ratio, torch.ones_like(ratio))
    return (scaled * ratio).to(hidden.dtype)
