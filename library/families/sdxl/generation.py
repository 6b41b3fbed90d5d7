"""SDXL prompt -> image: the shared latent-diffusion sampler with SDXL's conditioning.

Text goes through both encoders with the A1111 prompt language of ``gen_img.py`` (weights, ``BREAK``,
long prompts; :func:`library.generation.prompt_encoding.weighted_prompt_ids`), and every image gets
the size/crop micro-conditioning: by default original size = target size = the image size and crop
(0, 0), which is what SDXL was fine-tuned to read as "a clean, uncropped picture". A prompt's
``extras`` may override them (gen_img's ``--ow/--oh/--nw/--nh/--ct/--cl``): keys ``original_width``,
``original_height``, ``original_width_negative``, ``original_height_negative``, ``crop_top``,
``crop_left``.
"""

from __future__ import annotations

from typing import Any

import torch

from library.families.sd import text as sd_text
from library.families.sdxl import text
from library.sampling.pipeline import Conditioning, LatentDiffusionSampler
from library.sampling.prompts import SamplePrompt

SDXL_LATENT_SCALE = 0.13025


def _extra(prompt: SamplePrompt, key: str, default: int) -> int:
    value = prompt.extras.get(key) if prompt.extras else None
    return default if value is None else int(value)


def size_conditioning(prompt: SamplePrompt, *, negative: bool) -> torch.Tensor:
    """``[1, 6]`` ids (original h, w, crop top, left, target h, w) for the prompt's image."""
    height, width = prompt.height, prompt.width
    original_w = _extra(prompt, "original_width", width)
    original_h = _extra(prompt, "original_height", height)
    if negative:
        original_w = _extra(prompt, "original_width_negative", original_w)
        original_h = _extra(prompt, "original_height_negative", original_h)
    crop = (_extra(prompt, "crop_top", 0), _extra(prompt, "crop_left", 0))
    return torch.tensor([[original_h, original_w, *crop, height, width]], dtype=torch.float32)


def encode_prompts_sdxl(tokenizers, text_encoders, prompts: list[str], *, max_embeddings_multiples: int | None,
                        emb_normalize_mode: str = "original") -> Conditioning:
    """Both encoders' joined penultimate states and the pooled vector of ``prompts`` (no grad)."""
    from library.generation.prompt_encoding import weighted_prompt_ids

    tok1, tok2 = tokenizers
    ids1, weights = weighted_prompt_ids(tok1, prompts, max_embeddings_multiples=max_embeddings_multiples)
    ids2, _ = weighted_prompt_ids(tok2, prompts, max_embeddings_multiples=max_embeddings_multiples)
    with torch.no_grad():
        cond = text.encode_weighted(*text_encoders, ids1, ids2, weights, tok2.eos_token_id, emb_normalize_mode)
    return Conditioning(cond.context, {"added_cond_kwargs": {"text_embeds": cond.pooled}})


class SDXLSampler(LatentDiffusionSampler):
    """:class:`LatentDiffusionSampler` adding SDXL's ``time_ids`` to each prompt's conditioning."""

    @classmethod
    def for_models(cls, models: Any, *, max_token_length: int | None = None,
                   emb_normalize_mode: str = "original") -> SDXLSampler:
        """A sampler over a family's :class:`~library.families.base.FamilyModels`."""
        def encode(prompts: list[str]) -> Conditioning:
            return encode_prompts_sdxl(models.tokenizers, models.text_encoders, prompts,
                                       max_embeddings_multiples=sd_text.chunk_count(max_token_length),
                                       emb_normalize_mode=emb_normalize_mode)

        return cls(models.denoiser, models.vae, encode, latent_scale=SDXL_LATENT_SCALE)

    def encode(self, prompt: SamplePrompt, *, with_uncond: bool, device: torch.device,
               dtype: torch.dtype) -> tuple[Conditioning, Conditioning | None]:
        cond, uncond = super().encode(prompt, with_uncond=with_uncond, device=device, dtype=dtype)
        return (_with_size(cond, size_conditioning(prompt, negative=False), device, dtype),
                None if uncond is None else _with_size(uncond, size_conditioning(prompt, negative=True), device,
                                                       dtype))


def _with_size(cond: Conditioning, ids: torch.Tensor, device, dtype) -> Conditioning:
    added = dict(cond.unet_kwargs["added_cond_kwargs"])
    added["time_ids"] = ids.to(device=device, dtype=dtype).expand(cond.batch_size, -1)
    return Conditioning(cond.hidden_states, {**cond.unet_kwargs, "added_cond_kwargs": added})
