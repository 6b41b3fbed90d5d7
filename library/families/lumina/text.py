"""Lumina-Image 2.0's text conditioning: Gemma-2's penultimate hidden states and the caption mask.

* With ``--system_prompt S`` every caption (and preview prompt) is encoded as
  ``"S <Prompt Start> caption"`` (the reference's separator); an empty system prompt leaves it as is.
* :func:`tokenize`: right-padded and truncated to ``--gemma2_max_token_length`` (default 256) rounded
  up to a multiple of 8 (the reference pads to a multiple of 8 and fails for other lengths),
  ``<bos>`` first; returns ``input_ids`` and
  ``attention_mask`` Long ``[B, L]``. Picklable (it runs in DataLoader workers).
* :func:`encode`: ``hidden_states[-2]`` of ``Gemma2Model`` (the output of the second-to-last layer,
  before the final norm), as Lumina-Image 2.0 was trained.
* Cache files (``<image stem>_lumina_te.npz``, the reference's keys): ``hidden_state`` [L, D],
  ``attention_mask`` [L], ``input_ids`` [L] per sample.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

SYSTEM_PROMPT_SEPARATOR = "<Prompt Start>"
DEFAULT_MAX_TOKEN_LENGTH = 256
PAD_TO_MULTIPLE_OF = 8
#: cache keys of the reference's ``_lumina_te.npz``
CACHE_KEYS = ("hidden_state", "attention_mask", "input_ids")


def with_system_prompt(caption: str, system_prompt: str | None) -> str:
    """``"<system prompt> <Prompt Start> <caption>"``, or the caption alone without a system prompt."""
    return f"{system_prompt} {SYSTEM_PROMPT_SEPARATOR} {caption}" if system_prompt else caption


def system_prompt_fingerprint(system_prompt: str | None) -> int:
    """A 24-bit number of the system prompt, stored in each text-encoder cache file so a file
    encoded with another ``--system_prompt`` is encoded again (24 bits: exact in a float32 setting)."""
    return int(hashlib.sha256((system_prompt or "").encode("utf-8")).hexdigest()[:6], 16)


def tokenize(tokenizer, captions: list[str], max_length: int | None = None,
             system_prompt: str | None = None) -> dict[str, torch.Tensor]:
    """``{"input_ids", "attention_mask"}`` Long ``[B, L]`` with L = ``max_length`` rounded up to a multiple of 8."""
    texts = [with_system_prompt(c, system_prompt) for c in captions]
    # Rounded here: transformers refuses truncation to a length that is not a multiple of pad_to_multiple_of.
    length = -(-(max_length or DEFAULT_MAX_TOKEN_LENGTH) // PAD_TO_MULTIPLE_OF) * PAD_TO_MULTIPLE_OF
    encoded = tokenizer(texts, max_length=length, padding="max_length", truncation=True, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


@dataclass
class LuminaTextConditioning:
    """What the NextDiT is conditioned on: ``hidden [B, L, D]``, ``mask [B, L]`` bool (True = real
    token) and the token ids ``[B, L]`` they came from (kept for the cache files)."""

    hidden: torch.Tensor
    mask: torch.Tensor
    input_ids: torch.Tensor

    def to(self, device, dtype: torch.dtype) -> "LuminaTextConditioning":
        return LuminaTextConditioning(self.hidden.to(device=device, dtype=dtype), self.mask.to(device).bool(),
                                      self.input_ids.to(device))

    def repeat(self, other: "LuminaTextConditioning") -> "LuminaTextConditioning":
        """This batch followed by ``other`` (same token length), e.g. conditional + unconditional."""
        return LuminaTextConditioning(torch.cat((self.hidden, other.hidden)), torch.cat((self.mask, other.mask)),
                                      torch.cat((self.input_ids, other.input_ids)))


def encode(gemma2, ids: dict[str, torch.Tensor]) -> LuminaTextConditioning:
    """Gemma-2's penultimate hidden states of tokenized captions (ids on the encoder's device)."""
    out = gemma2(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], output_hidden_states=True)
    return LuminaTextConditioning(out.hidden_states[-2], ids["attention_mask"].bool(), ids["input_ids"])


def to_cache(conditioning: LuminaTextConditioning) -> dict[str, torch.Tensor]:
    return {"hidden_state": conditioning.hidden, "attention_mask": conditioning.mask.bool(),
            "input_ids": conditioning.input_ids}


def from_cache(cached: dict[str, torch.Tensor]) -> LuminaTextConditioning:
    """The conditioning of batched cache tensors (our files or the reference's: int64 mask and ids)."""
    return LuminaTextConditioning(cached["hidden_state"], cached["attention_mask"].bool(), cached["input_ids"].long())
