"""FLUX.1 text conditioning: CLIP-L pooled output + T5-XXL hidden states (+ the T5 attention mask).

Tokenisation runs in DataLoader workers (:func:`tokenize` is a plain module function, so
``functools.partial(tokenize, clip_tok, t5_tok, t5_max_length=512)`` pickles); encoding runs in
the trainer (:func:`encode`).

``--apply_t5_attn_mask`` (kohya's semantics): with it, T5 runs with the padding masked out and
the DiT masks the padding too; without it, T5 attends to the padding tokens and the DiT sees all
``t5_max_length`` tokens. The mask is carried in :class:`FluxTextConditioning` either way; whether
the DiT uses it is the caller's choice, by the same flag.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import CLIPTextModel, PreTrainedTokenizerBase, T5EncoderModel

CLIP_MAX_LENGTH = 77
#: Widths of the real encoders, for the zero stand-ins when one is absent (Chroma has no CLIP-L).
CLIP_L_WIDTH = 768
T5XXL_WIDTH = 4096


def default_t5_max_length(guidance_embed: bool) -> int:
    """kohya's ``--t5xxl_max_token_length`` default: 512 for dev (guidance-distilled, has a
    guidance embedding), 256 for schnell."""
    return 512 if guidance_embed else 256


def tokenize(clip_tokenizer: PreTrainedTokenizerBase | None, t5_tokenizer: PreTrainedTokenizerBase | None,
             captions: Sequence[str], t5_max_length: int) -> dict[str, torch.Tensor]:
    """Captions -> ``clip_ids`` Long [B, 77] (padded, truncated, BOS/EOS), ``t5_ids`` Long [B, L]
    (padded with 0, truncated, always ending in EOS), ``t5_mask`` Long [B, L] (1 for real tokens
    including EOS, 0 for padding), L = ``t5_max_length``. A ``None`` tokenizer leaves its keys out."""
    captions = list(captions)
    out: dict[str, torch.Tensor] = {}
    if clip_tokenizer is not None:
        out["clip_ids"] = clip_tokenizer(captions, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True,
                                         return_tensors="pt").input_ids
    if t5_tokenizer is not None:
        t5 = t5_tokenizer(captions, padding="max_length", max_length=t5_max_length, truncation=True,
                          return_tensors="pt")
        out["t5_ids"] = t5.input_ids
        out["t5_mask"] = t5.attention_mask
    return out


@dataclass
class FluxTextConditioning:
    """What the FLUX DiT is conditioned on: ``l_pooled`` [B, 768] (CLIP-L pooled, the DiT's
    ``vector_in``), ``t5_out`` [B, L, 4096] (T5 last hidden state, ``txt_in``), ``t5_attn_mask``
    [B, L] bool (True for real tokens)."""

    l_pooled: torch.Tensor
    t5_out: torch.Tensor
    t5_attn_mask: torch.Tensor

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
           ) -> FluxTextConditioning:
        """Move (and cast the float tensors); the mask stays bool."""
        return FluxTextConditioning(
            l_pooled=self.l_pooled.to(device=device, dtype=dtype),
            t5_out=self.t5_out.to(device=device, dtype=dtype),
            t5_attn_mask=self.t5_attn_mask.to(device=device, dtype=torch.bool),
        )


def _device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    first = next(model.parameters())
    return first.device, first.dtype


def encode(clip_l: CLIPTextModel | None, t5: T5EncoderModel | None, ids: dict[str, torch.Tensor], *,
           apply_t5_attn_mask: bool) -> FluxTextConditioning:
    """Run the encoders on :func:`tokenize`'s output (ids on any device; moved to each encoder's).

    ``l_pooled``: CLIP-L ``pooler_output`` (zeros [B, 768] when ``clip_l`` is None). ``t5_out``: T5's
    last hidden state, computed with ``t5_mask`` as attention mask only when
    ``apply_t5_attn_mask`` (zeros [B, L, 4096] when ``t5`` is None). Outputs are in the encoders'
    dtype, on the T5 device (CLIP's when there is no T5). Gradients flow when the caller enables
    them (text-encoder training).
    """
    if clip_l is None and t5 is None:
        raise ValueError("flux.text.encode: both text encoders are None; at least T5 (--t5xxl) is needed")
    if "t5_ids" not in ids or "t5_mask" not in ids:
        raise ValueError(f"flux.text.encode: ids has keys {sorted(ids)}, expected t5_ids and t5_mask from "
                         f"flux.text.tokenize (was the T5 tokenizer given?)")
    t5_ids, t5_mask = ids["t5_ids"], ids["t5_mask"]
    batch, length = t5_ids.shape

    if t5 is not None:
        device, dtype = _device_dtype(t5)
        mask = t5_mask.to(device) if apply_t5_attn_mask else None
        t5_out = t5(input_ids=t5_ids.to(device), attention_mask=mask).last_hidden_state
    else:
        device, dtype = _device_dtype(clip_l)
        t5_out = torch.zeros(batch, length, T5XXL_WIDTH, device=device, dtype=dtype)

    if clip_l is not None:
        if "clip_ids" not in ids:
            raise ValueError("flux.text.encode: a CLIP-L model was given but ids has no clip_ids (tokenize was called "
                             "without the CLIP tokenizer)")
        clip_device, _ = _device_dtype(clip_l)
        l_pooled = clip_l(input_ids=ids["clip_ids"].to(clip_device)).pooler_output.to(device)
    else:
        l_pooled = torch.zeros(batch, CLIP_L_WIDTH, device=device, dtype=dtype)
    return FluxTextConditioning(l_pooled=l_pooled, t5_out=t5_out, t5_attn_mask=t5_mask.to(device, torch.bool))
