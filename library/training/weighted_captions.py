"""``--weighted_captions``: A1111-style attention weights in captions, applied to the text encoder output.

The syntax and its parser live in :mod:`library.prompt_weights` (shared with generation):
``(text)`` x1.1, ``((text))`` x1.1**2, ``[text]`` /1.1, ``(text:1.3)`` x1.3, ``\\(`` ``\\)`` ``\\[``
``\\]`` ``\\\\`` literal; an unclosed bracket applies to the rest, a stray closer is literal text.
Captions do not treat ``BREAK`` specially (it is ordinary text here).

Application (:func:`apply_token_weights`, mode ``original``): every token of a span gets the span's
weight (BOS/EOS/padding get 1). After the text encoder, for each caption separately,
``h' = h * w[:, None]``, then ``h'' = h' * mean(h) / mean(h')`` where the means are over all
tokens and channels of that caption: the weights change the relative emphasis of the tokens while
the overall mean of the conditioning stays what the encoder produced, as A1111 does.
"""

from __future__ import annotations

from library.prompt_weights import ROUND, SQUARE, apply_token_weights, parse_prompt_weights

__all__ = ["ROUND", "SQUARE", "apply_token_weights", "parse_weighted_caption", "weighted_token_ids"]


def parse_weighted_caption(text: str) -> list[tuple[str, float]]:
    """``"a (b:1.3) [c]"`` -> ``[("a ", 1.0), ("b", 1.3), (" ", 1.0), ("c", 1/1.1)]``.

    :func:`library.prompt_weights.parse_prompt_weights` without ``BREAK`` markers. Neighbouring
    pieces of equal weight are merged; an empty caption gives ``[("", 1.0)]``.
    """
    return parse_prompt_weights(text, breaks=False)


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
