"""SD3 / SD3.5 text conditioning: CLIP-L + CLIP-G (penultimate layers, projected pooled outputs)
and T5-XXL, as the MMDiT consumes them.

Tokenisation runs in DataLoader workers (:func:`tokenize` is a plain module function, so
``functools.partial(tokenize, clip_l_tok, clip_g_tok, t5_tok, t5_max_length=256)`` pickles);
encoding runs in the trainer (:func:`encode`); per-encoder dropout runs at step time on fresh or
cached outputs (:func:`apply_dropout`).

Layout (kohya's, from SAI's reference code), real widths in brackets:

- ``lg_out`` [B, 77, 768 + 1280]: CLIP-L's and CLIP-G's penultimate hidden states (no final layer
  norm), concatenated along channels, CLIP-L first;
- ``lg_pooled`` [B, 768 + 1280]: each model's projected pooled output (``text_embeds``: the final-
  layer-normed state at the first EOS through ``text_projection``), CLIP-L first; the MMDiT's ``y``;
- ``t5_out`` [B, L, 4096]: T5's last hidden state, L = ``--t5xxl_max_token_length`` (256);
- the MMDiT context = ``lg_out`` zero-padded to the T5 width, then ``t5_out`` along the sequence:
  [B, 77 + L, 4096] (:meth:`SD3TextConditioning.context`).

CLIP-L pads with its EOS token, CLIP-G with ``!`` (id 0), as the SD3 tokenizers do. Masks are
1/True for real tokens including BOS and EOS. ``--apply_lg_attn_mask`` zeroes the CLIP hidden
states at padding positions (CLIP is causal, so real tokens and the pooled output are unaffected
by the padding either way); ``--apply_t5_attn_mask`` runs T5 with its mask and zeroes its padding
outputs. Without T5 (none given), ``t5_out`` is zeros.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from transformers import CLIPTextModelWithProjection, PreTrainedTokenizerBase, T5EncoderModel

CLIP_MAX_LENGTH = 77
#: Widths of the real encoders (CLIP-L hidden = projection = 768; CLIP-G 1280; T5-XXL 4096).
CLIP_L_WIDTH = 768
CLIP_G_WIDTH = 1280
T5XXL_WIDTH = 4096
#: kohya's ``--t5xxl_max_token_length`` default for SD3.
DEFAULT_T5_MAX_LENGTH = 256

#: The ``_sd3_te.npz`` keys written by :func:`to_cache` (the cache layer adds the two flags).
CACHE_KEYS = ("lg_out", "lg_pooled", "t5_out", "clip_l_attn_mask", "clip_g_attn_mask", "t5_attn_mask")


# ------------------------------------------------------------------------------------------------
# Tokenisation
# ------------------------------------------------------------------------------------------------

def tokenize(clip_l_tokenizer: PreTrainedTokenizerBase, clip_g_tokenizer: PreTrainedTokenizerBase,
             t5_tokenizer: PreTrainedTokenizerBase | None, captions: Sequence[str],
             t5_max_length: int = DEFAULT_T5_MAX_LENGTH) -> dict[str, torch.Tensor]:
    """Captions -> Long tensors ``clip_l_ids`` / ``clip_g_ids`` [B, 77] (BOS ... EOS, padded, truncated
    keeping EOS), ``t5_ids`` [B, L] (padded with 0, truncated, ending in EOS), and the masks
    ``clip_l_mask``, ``clip_g_mask``, ``t5_mask`` (1 for real tokens incl. BOS/EOS, 0 for padding),
    L = ``t5_max_length``.

    ``t5_tokenizer=None`` (no T5 in the setup): no ``t5_ids``, and ``t5_mask`` is all zeros [B, L]
    (no real T5 tokens), which tells :func:`encode` the length of the zero stand-in.
    """
    captions = list(captions)
    out: dict[str, torch.Tensor] = {}
    for name, tokenizer in (("clip_l", clip_l_tokenizer), ("clip_g", clip_g_tokenizer)):
        tokens = tokenizer(captions, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True,
                           return_tensors="pt")
        out[f"{name}_ids"] = tokens.input_ids
        out[f"{name}_mask"] = tokens.attention_mask
    if t5_tokenizer is not None:
        tokens = t5_tokenizer(captions, padding="max_length", max_length=t5_max_length, truncation=True,
                              return_tensors="pt")
        out["t5_ids"] = tokens.input_ids
        out["t5_mask"] = tokens.attention_mask
    else:
        out["t5_mask"] = torch.zeros(len(captions), t5_max_length, dtype=torch.long)
    return out


# ------------------------------------------------------------------------------------------------
# The conditioning
# ------------------------------------------------------------------------------------------------

@dataclass
class SD3TextConditioning:
    """What the SD3 MMDiT is conditioned on (see the module doc for the layout).

    ``lg_out`` [B, 77, Wl + Wg], ``lg_pooled`` [B, Wl + Wg], ``t5_out`` [B, L, Wt]; masks bool
    ``clip_l_mask`` / ``clip_g_mask`` [B, 77], ``t5_mask`` [B, L] (True = real token).
    ``clip_l_width`` = Wl, CLIP-L's hidden and projection width (768; they are equal in every CLIP-L),
    where the CLIP-G channels start in ``lg_out`` and ``lg_pooled``: what dropout needs to know.
    """

    lg_out: torch.Tensor
    lg_pooled: torch.Tensor
    t5_out: torch.Tensor
    clip_l_mask: torch.Tensor
    clip_g_mask: torch.Tensor
    t5_mask: torch.Tensor
    clip_l_width: int = CLIP_L_WIDTH

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
           ) -> SD3TextConditioning:
        """Move (and cast the float tensors to ``dtype``); masks stay bool."""
        return replace(
            self,
            lg_out=self.lg_out.to(device=device, dtype=dtype),
            lg_pooled=self.lg_pooled.to(device=device, dtype=dtype),
            t5_out=self.t5_out.to(device=device, dtype=dtype),
            clip_l_mask=self.clip_l_mask.to(device=device, dtype=torch.bool),
            clip_g_mask=self.clip_g_mask.to(device=device, dtype=torch.bool),
            t5_mask=self.t5_mask.to(device=device, dtype=torch.bool),
        )

    @property
    def pooled(self) -> torch.Tensor:
        """The MMDiT's pooled vector ``y``: ``lg_pooled`` [B, Wl + Wg]."""
        return self.lg_pooled

    def context(self) -> torch.Tensor:
        """The MMDiT context [B, 77 + L, Wt]: ``lg_out`` zero-padded on the channel axis to the T5 width
        Wt, followed by ``t5_out`` on the sequence axis (in ``lg_out``'s dtype)."""
        width, lg_width = self.t5_out.shape[-1], self.lg_out.shape[-1]
        if lg_width > width:
            raise ValueError(f"SD3 conditioning: CLIP-L + CLIP-G width {lg_width} exceeds the T5 width {width}; the "
                             f"text encoders do not belong to one SD3 model")
        padded = F.pad(self.lg_out, (0, width - lg_width))
        return torch.cat([padded, self.t5_out.to(padded.dtype)], dim=1)


def _device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    first = next(model.parameters())
    return first.device, first.dtype


def _need(ids: Mapping[str, torch.Tensor], *keys: str) -> None:
    missing = [k for k in keys if k not in ids]
    if missing:
        raise ValueError(f"sd3.text.encode: ids lack {missing} (has {sorted(ids)}); pass what sd3.text.tokenize "
                         f"returns")


def _clip(model: CLIPTextModelWithProjection, ids: torch.Tensor, mask: torch.Tensor, apply_mask: bool
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate hidden states [B, 77, W], projected pooled [B, P]) of one CLIP, masked if asked."""
    device, _ = _device_dtype(model)
    mask = mask.to(device)
    out = model(input_ids=ids.to(device), attention_mask=mask if apply_mask else None, output_hidden_states=True)
    hidden = out.hidden_states[-2]
    if apply_mask:
        hidden = hidden * mask.unsqueeze(-1).to(hidden.dtype)
    return hidden, out.text_embeds


def encode(clip_l: CLIPTextModelWithProjection, clip_g: CLIPTextModelWithProjection, t5: T5EncoderModel | None,
           ids: Mapping[str, torch.Tensor], *, apply_lg_attn_mask: bool = False, apply_t5_attn_mask: bool = False,
           t5_width: int = T5XXL_WIDTH) -> SD3TextConditioning:
    """Run the encoders on :func:`tokenize`'s output (ids on any device; moved to each encoder's).

    ``clip_l`` / ``clip_g`` must be ``CLIPTextModelWithProjection`` (``load_clip_l(...,
    with_projection=True)``): the pooled vector is their ``text_embeds``. ``t5=None``: ``t5_out``
    is zeros [B, L, ``t5_width``] (the MMDiT context width; 4096 for real models). The outputs are
    on T5's device (CLIP-L's without T5), ``lg_*`` in CLIP-L's dtype, ``t5_out`` in T5's. Gradients
    flow when the caller enables them (text-encoder training).
    """
    if clip_l is None or clip_g is None:
        raise ValueError("sd3.text.encode: SD3 needs both CLIP-L and CLIP-G (--clip_l / --clip_g or the model file)")
    for name, model in (("clip_l", clip_l), ("clip_g", clip_g)):
        if not isinstance(model, CLIPTextModelWithProjection):
            raise TypeError(f"sd3.text.encode: {name} is a {type(model).__name__}; SD3 needs the projected pooled "
                            f"output, load it with with_projection=True")
    _need(ids, "clip_l_ids", "clip_l_mask", "clip_g_ids", "clip_g_mask", "t5_mask")
    if clip_l.config.hidden_size != clip_l.config.projection_dim:
        raise ValueError(f"sd3.text.encode: CLIP-L hidden width {clip_l.config.hidden_size} differs from its "
                         f"projection width {clip_l.config.projection_dim}; not an SD3 CLIP-L")
    t5_mask = ids["t5_mask"]

    if t5 is not None:
        _need(ids, "t5_ids")
        device, _ = _device_dtype(t5)
        mask = t5_mask.to(device)
        t5_out = t5(input_ids=ids["t5_ids"].to(device), attention_mask=mask if apply_t5_attn_mask else None
                    ).last_hidden_state
        if apply_t5_attn_mask:
            t5_out = t5_out * mask.unsqueeze(-1).to(t5_out.dtype)
    else:
        device, dtype = _device_dtype(clip_l)
        t5_out = torch.zeros(*t5_mask.shape, t5_width, device=device, dtype=dtype)

    l_out, l_pooled = _clip(clip_l, ids["clip_l_ids"], ids["clip_l_mask"], apply_lg_attn_mask)
    g_out, g_pooled = _clip(clip_g, ids["clip_g_ids"], ids["clip_g_mask"], apply_lg_attn_mask)
    dtype = l_out.dtype
    lg_out = torch.cat([l_out.to(device), g_out.to(device=device, dtype=dtype)], dim=-1)
    lg_pooled = torch.cat([l_pooled.to(device), g_pooled.to(device=device, dtype=dtype)], dim=-1)
    return SD3TextConditioning(
        lg_out=lg_out, lg_pooled=lg_pooled, t5_out=t5_out,
        clip_l_mask=ids["clip_l_mask"].to(device, torch.bool), clip_g_mask=ids["clip_g_mask"].to(device, torch.bool),
        t5_mask=t5_mask.to(device, torch.bool), clip_l_width=clip_l.config.hidden_size)


# ------------------------------------------------------------------------------------------------
# Per-encoder conditioning dropout (--clip_l_dropout_rate, --clip_g_dropout_rate, --t5_dropout_rate)
# ------------------------------------------------------------------------------------------------

def apply_dropout(cond: SD3TextConditioning, *, clip_l_rate: float = 0.0, clip_g_rate: float = 0.0,
                  t5_rate: float = 0.0, generator: torch.Generator | None = None) -> SD3TextConditioning:
    """Drop each encoder's conditioning per sample, independently: a dropped CLIP-L zeroes its
    ``clip_l_width`` channels of ``lg_out`` and ``lg_pooled``, CLIP-G the remaining channels, T5 its
    ``t5_out``; the dropped encoder's mask is zeroed too (kohya does the same: no real tokens left).

    Randomness: with any rate > 0, one ``torch.rand(B, 3)`` draw on the CPU from ``generator`` (the
    global torch CPU RNG when None): column 0 decides CLIP-L, 1 CLIP-G, 2 T5, sample i drops when
    its draw < rate. So the stream consumed depends on the batch size only, not on which rates are
    set. All rates 0: nothing is drawn and ``cond`` itself is returned.

    Returns a new conditioning; ``cond`` is not modified (it may be an in-memory cache entry). The
    keep masks are drawn on the CPU and copied to the tensors' device: no host sync.
    """
    for name, rate in (("clip_l_dropout_rate", clip_l_rate), ("clip_g_dropout_rate", clip_g_rate),
                       ("t5_dropout_rate", t5_rate)):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"--{name} must be in [0, 1], got {rate}")
    if clip_l_rate == 0.0 and clip_g_rate == 0.0 and t5_rate == 0.0:
        return cond
    batch, lg_width = cond.lg_out.shape[0], cond.lg_out.shape[-1]
    if not 0 < cond.clip_l_width < lg_width or cond.lg_pooled.shape[-1] != lg_width:
        raise ValueError(f"sd3.text.apply_dropout: CLIP-L width {cond.clip_l_width} does not split lg_out "
                         f"({lg_width} channels) / lg_pooled ({cond.lg_pooled.shape[-1]}) into CLIP-L and CLIP-G parts")
    draws = torch.rand(batch, 3, generator=generator)
    keep = draws >= torch.tensor([clip_l_rate, clip_g_rate, t5_rate])  # [B, 3] bool, CPU
    if cond.lg_out.device.type == "cuda":
        keep = keep.pin_memory()  # so the copy below is truly asynchronous
    keep = keep.to(cond.lg_out.device, non_blocking=True)
    keep_l, keep_g, keep_t5 = keep.unbind(dim=1)

    def channel_keep(width: int) -> torch.Tensor:  # [B, width]: CLIP-L's channels, then CLIP-G's
        split = cond.clip_l_width
        return torch.cat([keep_l[:, None].expand(batch, split), keep_g[:, None].expand(batch, width - split)], dim=1)

    # torch.where, not a product: exact zeros whatever the values (inf * 0 would be NaN).
    lg_keep = channel_keep(lg_width)
    return replace(
        cond,
        lg_out=torch.where(lg_keep[:, None, :], cond.lg_out, 0.0),
        lg_pooled=torch.where(lg_keep.to(cond.lg_pooled.device), cond.lg_pooled, 0.0),
        t5_out=torch.where(keep_t5.to(cond.t5_out.device)[:, None, None], cond.t5_out, 0.0),
        clip_l_mask=cond.clip_l_mask & keep_l.to(cond.clip_l_mask.device)[:, None],
        clip_g_mask=cond.clip_g_mask & keep_g.to(cond.clip_g_mask.device)[:, None],
        t5_mask=cond.t5_mask & keep_t5.to(cond.t5_mask.device)[:, None],
    )


# ------------------------------------------------------------------------------------------------
# Text-encoder output cache (kohya's ``_sd3_te.npz`` keys)
# ------------------------------------------------------------------------------------------------

def to_cache(cond: SD3TextConditioning) -> dict[str, torch.Tensor]:
    """The cache entries ``{key: [B, ...]}`` with kohya's ``_sd3_te.npz`` names (:data:`CACHE_KEYS`);
    masks bool. The ``apply_lg_attn_mask`` / ``apply_t5_attn_mask`` flags are the cache layer's."""
    return {
        "lg_out": cond.lg_out,
        "lg_pooled": cond.lg_pooled,
        "t5_out": cond.t5_out,
        "clip_l_attn_mask": cond.clip_l_mask.bool(),
        "clip_g_attn_mask": cond.clip_g_mask.bool(),
        "t5_attn_mask": cond.t5_mask.bool(),
    }


def clip_l_width_for(lg_width: int) -> int:
    """CLIP-L's share of an ``lg_out`` width the files do not record: 768 for the real 768 + 1280.
    Any other width (tiny demo models) must be told; a one-line error says so."""
    if lg_width == CLIP_L_WIDTH + CLIP_G_WIDTH:
        return CLIP_L_WIDTH
    raise ValueError(f"SD3 text-encoder outputs are {lg_width} channels wide, not CLIP-L + CLIP-G's "
                     f"{CLIP_L_WIDTH + CLIP_G_WIDTH}: pass clip_l_width (the CLIP-L model's hidden size)")


def from_cache(cached: Mapping[str, torch.Tensor], *, clip_l_width: int | None = None) -> SD3TextConditioning:
    """Inverse of :func:`to_cache` (masks of any dtype become bool).

    ``clip_l_width``: CLIP-L's width, which the files do not store; None means 768 and is only
    accepted for the real 2048-channel outputs (:func:`clip_l_width_for`), so tiny models pass theirs.
    """
    missing = [k for k in CACHE_KEYS if k not in cached]
    if missing:
        raise KeyError(f"SD3 text-encoder cache entry lacks {missing} (has {sorted(cached)}); re-cache the outputs")
    if clip_l_width is None:
        clip_l_width = clip_l_width_for(cached["lg_out"].shape[-1])
    return SD3TextConditioning(
        lg_out=cached["lg_out"], lg_pooled=cached["lg_pooled"], t5_out=cached["t5_out"],
        clip_l_mask=cached["clip_l_attn_mask"].bool(), clip_g_mask=cached["clip_g_attn_mask"].bool(),
        t5_mask=cached["t5_attn_mask"].bool(), clip_l_width=clip_l_width)


__all__ = [
    "CACHE_KEYS",
    "CLIP_G_WIDTH",
    "CLIP_L_WIDTH",
    "CLIP_MAX_LENGTH",
    "DEFAULT_T5_MAX_LENGTH",
    "SD3TextConditioning",
    "T5XXL_WIDTH",
    "apply_dropout",
    "clip_l_width_for",
    "encode",
    "from_cache",
    "tokenize",
]
