"""Prompts (A1111 weights, ``BREAK``) -> SD 1.x/2.x text-encoder conditioning, any length.

Rules of :func:`encode_prompts`:

* Tokens: each prompt is parsed by :func:`library.prompt_weights.parse_prompt_weights`; each text
  segment is tokenised on its own (no BOS/EOS) and its tokens carry the segment's weight
  (:func:`tokens_and_weights`). ``BREAK`` ends the current 75-token chunk: the rest of the chunk is
  filled with EOS then padding tokens (all EOS for SD1, whose padding is EOS), weight 1, exactly how
  a prompt that ends there fills it. A ``BREAK`` at the start of a chunk (start of the prompt, right
  after a full chunk or after another ``BREAK``) does nothing.
* Chunks: ``max_embeddings_multiples`` k (``None`` means 1: the classic 77-token truncation, as the
  reference ``gen_img.py`` does when the flag is not given) is the most chunks a prompt may use;
  tokens past ``75 * k`` are dropped (a warning is logged once per process). The batch uses
  ``n = max(1, ceil(longest prompt's tokens / 75))`` chunks, so every prompt encoded in the same call
  (e.g. cond and uncond for CFG) gets the same length ``75 * n + 2``; shorter prompts end with EOS
  and padding, their extra chunks being empty-prompt chunks.
* Encoding: the ``[B, n, 77]`` ids are laid out exactly as training's
  :func:`library.families.sd.text.tokenize` lays them out, and encoded by
  :func:`library.families.sd.text.encode` (each chunk separately; ``clip_skip`` as there; joined as
  the first chunk's BOS vector, the 75 middle vectors of every chunk, the last chunk's end vector),
  so training and generation condition the same way. With all weights 1 the result equals
  ``text.encode(te, text.tokenize(tok, prompts, 75 * n))`` for prompts without markup.
* Weights: the encoder output of each token is multiplied by its weight (BOS/EOS/padding: 1), then
  renormalised per prompt by ``emb_normalize_mode`` (:func:`library.prompt_weights.apply_token_weights`):
  ``original`` keeps the mean over all elements, ``abs`` the mean of absolute values, ``none``
  leaves the scaled output as is.
"""

from __future__ import annotations

import logging
import math

import torch
from transformers import CLIPTextModel, PreTrainedTokenizerBase

from library.families.sd import text
from library.prompt_weights import EMB_NORMALIZE_MODES, apply_token_weights, is_break, parse_prompt_weights

logger = logging.getLogger(__name__)

TEXT_PER_CHUNK = text.TEXT_PER_CHUNK
_warned_truncation = False


def tokens_and_weights(tokenizer: PreTrainedTokenizerBase, prompt: str) -> tuple[list[int], list[float]]:
    """Text token ids of ``prompt`` (no BOS/EOS, not truncated) and the weight of each.

    ``BREAK`` is already applied: the current chunk is filled up to a multiple of 75 tokens with EOS
    then padding ids, weight 1 (nothing when the chunk is empty). See the module docstring.
    """
    segments = parse_prompt_weights(prompt)
    spans = [s for s in segments if not is_break(s) and s[0].strip()]
    encoded = iter(tokenizer([s for s, _ in spans], add_special_tokens=False).input_ids if spans else [])
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids: list[int] = []
    weights: list[float] = []
    for segment in segments:
        if is_break(segment):
            fill = -len(ids) % TEXT_PER_CHUNK
            if fill:
                ids.extend([eos] + [pad] * (fill - 1))
                weights.extend([1.0] * fill)
        elif segment[0].strip():
            span_ids = next(encoded)
            ids.extend(span_ids)
            weights.extend([float(segment[1])] * len(span_ids))
    return ids, weights


def weighted_prompt_ids(tokenizer: PreTrainedTokenizerBase, prompts: list[str], *,
                        max_embeddings_multiples: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked token ids ``[B, n, 77]`` and per-token weights ``[B, 75 * n + 2]`` of ``prompts``.

    The tokenisation half of :func:`encode_prompts` (rules in the module docstring), for families
    that encode the ids with more than one text encoder (SDXL): every tokenizer of the same
    vocabulary gives the same text ids and weights, only the padding ids differ.
    """
    global _warned_truncation
    if not prompts:
        raise ValueError("encode_prompts needs at least one prompt")
    max_chunks = 1 if max_embeddings_multiples is None else int(max_embeddings_multiples)
    if max_chunks < 1:
        raise ValueError(f"max_embeddings_multiples must be at least 1, got {max_embeddings_multiples}")
    limit = TEXT_PER_CHUNK * max_chunks

    rows = [tokens_and_weights(tokenizer, p) for p in prompts]
    if any(len(ids) > limit for ids, _ in rows):
        if not _warned_truncation:
            logger.warning("a prompt is longer than %d tokens (max_embeddings_multiples=%s); the rest is "
                           "ignored (this warning is shown once)", limit, max_embeddings_multiples)
            _warned_truncation = True
        rows = [(ids[:limit], weights[:limit]) for ids, weights in rows]
    n = max(1, max(math.ceil(len(ids) / TEXT_PER_CHUNK) for ids, _ in rows))
    length = TEXT_PER_CHUNK * n + 2

    flat_ids = torch.full((len(prompts), length), tokenizer.pad_token_id, dtype=torch.long)
    flat_weights = torch.ones((len(prompts), length), dtype=torch.float32)
    for row, (ids, weights) in enumerate(rows):
        flat_ids[row, 0] = tokenizer.bos_token_id
        flat_ids[row, 1:1 + len(ids)] = torch.tensor(ids, dtype=torch.long)
        flat_ids[row, 1 + len(ids)] = tokenizer.eos_token_id
        flat_weights[row, 1:1 + len(ids)] = torch.tensor(weights, dtype=torch.float32)
    # The same chunk layout as training's text.tokenize (SD2: EOS/pad end tokens per chunk).
    return text.split_chunks(flat_ids, tokenizer, n), flat_weights


def encode_prompts(tokenizer: PreTrainedTokenizerBase, text_encoder: CLIPTextModel, prompts: list[str], *,
                   max_embeddings_multiples: int | None = None, clip_skip: int | None = None,
                   emb_normalize_mode: str = "original") -> torch.Tensor:
    """Conditioning ``[B, 75 * n + 2, D]`` for ``prompts`` (already expanded: no ``{...}`` groups).

    ``n`` is the number of 75-token chunks the longest prompt needs, at most
    ``max_embeddings_multiples`` (``None``: 1). The rules are in the module docstring. Raises
    ``ValueError`` for an empty ``prompts`` list, ``max_embeddings_multiples < 1`` or an unknown
    ``emb_normalize_mode``. The result is on the text encoder's device, in its output dtype, computed
    without gradients.
    """
    if emb_normalize_mode not in EMB_NORMALIZE_MODES:
        raise ValueError(f"emb_normalize_mode must be one of {EMB_NORMALIZE_MODES}, got {emb_normalize_mode!r}")
    chunks, flat_weights = weighted_prompt_ids(tokenizer, prompts, max_embeddings_multiples=max_embeddings_multiples)
    with torch.no_grad():
        hidden = text.encode(text_encoder, chunks, clip_skip=clip_skip)
    return apply_token_weights(hidden, flat_weights, emb_normalize_mode)
