"""``--weighted_captions``: A1111-style attention weights in captions, applied to the text encoder output.

Syntax (the one users know from AUTOMATIC1111's web UI):

* ``(text)`` multiplies the weight of ``text`` by 1.1, ``((text))`` by 1.1**2, and so on;
* ``[text]`` divides it by 1.1;
* ``(text:1.3)`` multiplies it by 1.3 (any decimal, also ``0.5`` or ``-1``);
* ``\\(``, ``\\)``, ``\\[``, ``\\]``, ``\\\\`` are the literal characters; any other backslash is literal;
* a bracket that is never closed applies to the rest of the caption; a closing bracket with no
  opening one is literal text.

Application (what :func:`apply_token_weights` does): every token of a span gets the span's
weight (BOS/EOS/padding get 1). After the text encoder, for each caption separately,
``h' = h * w[:, None]``, then ``h'' = h' * mean(h) / mean(h')`` where the means are over all
tokens and channels of that caption: the weights change the relative emphasis of the tokens while
the overall mean of the conditioning stays what the encoder produced, as A1111 does.
"""

from __future__ import annotations

import re

import torch

ROUND = 1.1
SQUARE = 1 / 1.1
_EXPLICIT = re.compile(r":\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)")
_ESCAPABLE = "()[]\\"


def parse_weighted_caption(text: str) -> list[tuple[str, float]]:
    """``"a (b:1.3) [c]"`` -> ``[("a ", 1.0), ("b", 1.3), (" ", 1.0), ("c", 1/1.1)]``.

    Neighbouring pieces of equal weight are merged; an empty caption gives ``[("", 1.0)]``.
    """
    pieces: list[list] = []  # [text, weight], weights multiplied in place when a bracket closes
    open_round: list[int] = []
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] in _ESCAPABLE:
            pieces.append([text[i + 1], 1.0])
            i += 2
            continue
        if ch == "(":
            open_round.append(len(pieces))
        elif ch == "[":
            open_square.append(len(pieces))
        elif ch == ":" and open_round and (m := _EXPLICIT.match(text, i)):
            scale(open_round.pop(), float(m.group(1)))
            i = m.end()
            continue
        elif ch == ")" and open_round:
            scale(open_round.pop(), ROUND)
        elif ch == "]" and open_square:
            scale(open_square.pop(), SQUARE)
        else:
            pieces.append([ch, 1.0])
        i += 1
    for start in open_round:
        scale(start, ROUND)
    for start in open_square:
        scale(start, SQUARE)

    merged: list[tuple[str, float]] = []
    for piece_text, weight in pieces:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + piece_text, weight)
        else:
            merged.append((piece_text, weight))
    return merged or [("", 1.0)]


def weighted_token_ids(tokenizer, caption: str, max_text_tokens: int) -> tuple[list[int], list[float]]:
    """Text token ids (no BOS/EOS) of a caption and the weight of each, truncated to ``max_text_tokens``."""
    ids: list[int] = []
    weights: list[float] = []
    spans = [s for s in parse_weighted_caption(caption) if s[0].strip()]
    if spans:
        encoded = tokenizer([s for s, _ in spans], add_special_tokens=False).input_ids
        for span_ids, (_, weight) in zip(encoded, spans):
            ids.extend(span_ids)
            weights.extend([weight] * len(span_ids))
    return ids[:max_text_tokens], weights[:max_text_tokens]


def apply_token_weights(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``hidden [B,T,D]`` scaled by ``weights [B,T]``, rescaled to keep each caption's mean (see module doc)."""
    weights = weights.to(device=hidden.device, dtype=torch.float32)
    before = hidden.float().mean(dim=(1, 2), keepdim=True)
    scaled = hidden.float() * weights.unsqueeze(-1)
    after = scaled.mean(dim=(1, 2), keepdim=True)
    return (scaled * (before / after)).to(hidden.dtype)
