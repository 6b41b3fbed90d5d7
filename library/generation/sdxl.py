"""SDXL in ``gen_img.py`` (``--sdxl``): :class:`SDXLGenerator`, the SD generator with SDXL's conditioning.

What differs from SD 1.x/2.x (everything else, the loop, guidance, img2img, inpainting, hires fix,
networks, is :class:`~library.generation.runner.SDGenerator`'s):

* Models: :func:`library.families.sdxl.loading.load_sdxl_models`; the two text encoders and
  tokenizers travel as lists ``[CLIP-L, OpenCLIP bigG]`` (what network modules'
  ``create_network_from_weights(..., text_encoder=[te1, te2], unet=unet)`` take).
* Text: :func:`library.families.sdxl.generation.encode_prompts_sdxl`: both encoders' penultimate
  layers joined (SDXL always reads layer -2, so ``--clip_skip`` is 2 and another value is ignored
  with a warning) and text encoder 2's pooled vector (``text_embeds``).
* Size conditioning (``time_ids``, one row per image and role): original size (``--original_width``
  / ``--original_height``, in a prompt ``--ow`` / ``--oh``; default: the image size), crop
  (``--crop_top`` / ``--crop_left``, ``--ct`` / ``--cl``; default 0, 0), target size = the image
  size. The negative prompt, and the empty unconditional input of ``--negative_scale``, use
  ``--original_width_negative`` / ``--original_height_negative`` (``--nw`` / ``--nh``; default: the
  positive original size). A prompt's values win over the flags. A hires-fix first pass is
  conditioned on its own size, and given original sizes and crops are scaled by
  ``--highres_fix_scale`` (as the reference does).
* CLIP-Vision img2img conditioning (``--clip_vision_strength``, :mod:`library.generation.clip_vision`):
  the positive rows' pooled text embedding is replaced by strength x the init image's CLIP-Vision
  image embedding; the vision model loads on first use and each init image is encoded once.
* Latents: VAE scale 0.13025.
* Textual inversion files hold ``clip_l`` [n, 768] and ``clip_g`` [n, 1280] (one table per encoder).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from library.families.sdxl.generation import SDXL_LATENT_SCALE, encode_prompts_sdxl, size_conditioning
from library.generation.clip_vision import (
    DEFAULT_CLIP_VISION_MODEL,
    ClipVisionEncoder,
    ClipVisionError,
    load_clip_vision,
)
from library.generation.images import InitImage
from library.generation.runner import GenerationError, ImageJob, ModelParts, PassSize, SDGenerator
from library.sampling.pipeline import Conditioning
from library.sampling.prompts import SamplePrompt

logger = logging.getLogger(__name__)

__all__ = ["SDXLGenerator", "family_mismatch", "size_ids"]

_warned_clip_skip = False


def size_ids(job: ImageJob, *, negative: bool, size: PassSize = None) -> torch.Tensor:
    """``[1, 6]`` size/crop ids of ``job``'s image (rules in the module docstring)."""
    width, height, options = job.width, job.height, dict(job.size_options)
    if size is not None:
        width, height, scale = size
        options = {key: int(value * scale + 0.5) for key, value in options.items()}
    return size_conditioning(SamplePrompt(job.prompt, width=width, height=height, extras=options), negative=negative)


class SDXLGenerator(SDGenerator):
    """:class:`SDGenerator` for an SDXL base model; ``text_encoder`` and ``tokenizer`` are lists of two."""

    latent_scale = SDXL_LATENT_SCALE
    embedding_keys = ("clip_l", "clip_g")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Loaded on first use from the current args (a preloaded generator may serve runs with other flags).
        self._clip_vision: ClipVisionEncoder | None = None
        self._image_embeds: dict[int, tuple[InitImage, torch.Tensor]] = {}
        self._embeds_args: Any = None

    @classmethod
    def load_models(cls, args) -> ModelParts:
        from library.families.sdxl.loading import load_sdxl_models

        m = load_sdxl_models(args.ckpt, vae_path=args.vae, tokenizer_cache_dir=args.tokenizer_cache_dir,
                             keep_extras=False)
        return ModelParts(m.unet, m.vae, m.text_encoders, m.tokenizers)

    def encode_texts(self, texts: list[str]) -> Conditioning:
        global _warned_clip_skip
        if self.args.clip_skip not in (None, 2) and not _warned_clip_skip:
            logger.warning("--clip_skip %s is ignored: SDXL always uses the penultimate text encoder layers "
                           "(clip_skip 2)", self.args.clip_skip)
            _warned_clip_skip = True
        texts = [self.embeddings.expand(t) for t in texts]
        return encode_prompts_sdxl(self.tokenizer, self.text_encoder, texts,
                                   max_embeddings_multiples=self.args.max_embeddings_multiples,
                                   emb_normalize_mode=self.args.emb_normalize_mode)

    def _image_conditioning(self, cond: Conditioning, jobs: Sequence[ImageJob], negative: Sequence[bool],
                            size: PassSize) -> Conditioning:
        ids = torch.cat([size_ids(job, negative=neg, size=size) for job, neg in zip(jobs, negative)])
        hidden = cond.hidden_states
        added = {**cond.unet_kwargs["added_cond_kwargs"], "time_ids": ids.to(hidden.device, hidden.dtype)}
        if self.args.clip_vision_strength is not None:
            added["text_embeds"] = self._clip_vision_pooled(added["text_embeds"], jobs, negative)
        return Conditioning(hidden, {**cond.unet_kwargs, "added_cond_kwargs": added})

    def _clip_vision_pooled(self, pooled: torch.Tensor, jobs: Sequence[ImageJob],
                            negative: Sequence[bool]) -> torch.Tensor:
        """``pooled`` with each positive img2img row replaced by strength x its init image's CLIP-Vision
        embedding (a new tensor: the cached text conditioning stays as it is)."""
        rows = [i for i, (job, neg) in enumerate(zip(jobs, negative)) if not neg and job.init is not None]
        if not rows:
            return pooled
        embeds = torch.cat([self._init_image_embeds(jobs[i]) for i in rows]) * self.args.clip_vision_strength
        if embeds.shape[1] != pooled.shape[1]:
            raise GenerationError(f"--clip_vision_model {self._clip_vision.name}: its image embeddings are "
                                  f"{embeds.shape[1]}-d but this SDXL model's pooled text embedding is "
                                  f"{pooled.shape[1]}-d; use the ViT-bigG-14 model (the default)")
        replaced = pooled.clone()
        replaced[rows] = embeds.to(pooled.device, pooled.dtype)
        return replaced

    def _init_image_embeds(self, job: ImageJob) -> torch.Tensor:
        """CLIP-Vision ``image_embeds`` [1, D] of ``job``'s init image, encoded once per run and image
        (an init image is shared by its prompt's images and batches)."""
        wanted = self.args.clip_vision_model or DEFAULT_CLIP_VISION_MODEL
        if self._clip_vision is None or self._clip_vision.name != wanted:
            try:
                self._clip_vision = load_clip_vision(wanted, self.device, self.dtype)
            except ClipVisionError as e:
                raise GenerationError(str(e)) from None
            self._image_embeds.clear()
        if self._embeds_args is not self.args:  # a new run: its own InitImage objects
            self._image_embeds.clear()
            self._embeds_args = self.args
        init = job.init
        cached = self._image_embeds.get(id(init))
        if cached is None:  # the dict holds the InitImage itself, so its id is not reused while cached
            cached = self._image_embeds[id(init)] = (init, self._clip_vision.encode([init.image]))
        return cached[1]

    def png_fields(self, job: ImageJob) -> dict[str, Any]:
        oh, ow, top, left = (int(v) for v in size_ids(job, negative=False)[0, :4])
        nh, nw = (int(v) for v in size_ids(job, negative=True)[0, :2])
        return {"original-height": oh, "original-width": ow, "original-height-negative": nh,
                "original-width-negative": nw, "crop-top": top, "crop-left": left}


def _model_family(path: Path) -> str | None:
    """``"sdxl"``, ``"sd"`` or ``None`` (unknown) for a model file or Diffusers folder."""
    if path.is_dir():
        if (path / "text_encoder_2").is_dir():
            return "sdxl"
        return "sd" if (path / "text_encoder").is_dir() else None
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
        else:
            from library.families.sd.loading import read_checkpoint

            keys = list(read_checkpoint(path))
    except Exception:  # noqa: BLE001 - only a hint for an error message; the loader's message stands otherwise
        return None
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return "sdxl"
    return "sd" if any(k.startswith("cond_stage_model.") for k in keys) else None


def family_mismatch(ckpt: str, *, sdxl: bool) -> str | None:
    """The one-line error for an SD model given with ``--sdxl`` or an SDXL model without it, else None."""
    family = _model_family(Path(ckpt))
    if sdxl and family == "sd":
        return f"--ckpt {ckpt} is an SD 1.x/2.x model, not SDXL: drop --sdxl (add --v2 for an SD 2.x model)"
    if not sdxl and family == "sdxl":
        return f"--ckpt {ckpt} is an SDXL model: add --sdxl"
    return None
