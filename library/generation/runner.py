"""The ``gen_img.py`` generation loop (SD 1.x/2.x, SDXL): prompts -> image jobs -> batches -> PNG files.

Flow: :func:`run` loads the model (:func:`load_generator`: :class:`SDGenerator`, or with ``--sdxl``
:class:`library.generation.sdxl.SDXLGenerator`), textual inversion embeddings, networks; then, per
``--n_iter`` iteration, every prompt line is parsed (:func:`parse_gen_line`: in-prompt options
``--n --w --h --s --d --l --nl --t --am --f`` and SDXL's ``--ow --oh --nw --nh --ct --cl``), its
dynamic prompt expanded (one line may enumerate several prompts), turned into
``--images_per_prompt`` :class:`ImageJob` s, and the jobs are denoised ``--batch_size`` at a time
when their settings agree.

Seeds (:class:`SeedSource`): with ``--seed S`` the images' seeds are the successive draws
``random.Random(S).randrange(2**32)``, one per image in generation order (an image whose seed comes
from ``--d`` still uses up its draw, so the other images keep theirs); ``--iter_same_seed`` restarts
the draws at every iteration, so iteration k repeats iteration 1's seeds. Without ``--seed`` every
image gets a random seed (``--iter_same_seed`` alone: a random S, then as above). Dynamic prompts
and ``--shuffle_prompts`` draw from their own ``random.Random(S)``.

Noise: each image's noise is drawn from its own CPU ``torch.Generator`` seeded with its seed (the
initial noise, then the ancestral samplers' per-step noise, then the hires-fix second pass), so an
image depends only on its seed and settings, not on its batch or position, and is bit-identical on
CPU for the same arguments. This goes through the shared ``sample_latents`` loop with a scheduler
proxy (:class:`~library.generation.seeded_scheduler.SeededScheduler`) that supplies the per-image noise.

Inpainting (``--mask_path``) is latent blending: after every denoising step the region to keep
(mask 0) is replaced by the init latents noised to the level of the next step (with the image's
own noise), and after the last step by the init latents themselves; the masked region (1) is
generated. Second-order samplers (heun, dpm_2) blend after each of their two calls (approximate).
"""

from __future__ import annotations

import importlib.util

import logging
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from library.families.sd.family import LATENT_SCALE
from library.generation.clip_vision import ClipVisionError, find_clip_vision_model
from library.generation.control import ControlInputError, Controls, load_controls
from library.generation.images import (
    ImageInputError,
    InitImage,
    OutputNamer,
    image_to_tensor,
    load_init_images,
    mask_to_latent_mask,
    png_text_fields,
    save_image,
)
from library.generation.networks import LoadedNetworks, NetworkError, load_networks
from library.generation.seeded_scheduler import SeededScheduler
from library.generation.textual_inversion import EmbeddingError, Embeddings, load_embeddings
from library.sampling.pipeline import Conditioning, LatentDiffusionSampler, latents_to_images, sample_latents
from library.sampling.prompts import (
    SAMPLE_PROMPT_OPTIONS,
    PromptDefaults,
    PromptFileError,
    PromptOption,
    SamplePrompt,
    as_finite_float,
    parse_prompt_line,
)
from library.sampling.schedulers import make_scheduler

logger = logging.getLogger(__name__)
_warned_size_options = False

__all__ = ["GEN_IMG_OPTIONS", "GenerationError", "ImageJob", "SDGenerator", "SeedSource", "parse_gen_line", "run"]


class GenerationError(RuntimeError):
    """gen_img cannot go on; the message names the flag/file and the fix."""


# --- prompt lines ---------------------------------------------------------------------------

def _seed_list(value: Any) -> tuple[int, ...]:
    seeds = []
    for part in str(value).split(","):
        part = part.strip()
        if not part:
            continue
        seed = int(part)  # ValueError -> reported by parse_prompt_line
        if not 0 <= seed < 2**64:
            raise ValueError("seeds must be between 0 and 2**64-1")
        seeds.append(seed)
    if not seeds:
        raise ValueError("expected comma-separated integer seeds")
    return tuple(seeds)


def _float_list(value: Any) -> tuple[float, ...]:
    values = tuple(as_finite_float(p) for p in str(value).split(",") if p.strip())
    if not values:
        raise ValueError("expected comma-separated numbers")
    return values


def _negative_scale(value: Any) -> float | str:
    text = str(value).strip()
    return "none" if text.lower() == "none" else as_finite_float(text)


def _strength(value: Any) -> float:
    s = float(value)
    if not 0.0 <= s <= 1.0:
        raise ValueError("strength must be between 0 and 1")
    return s


def _file_name(value: Any) -> str:
    name = str(value).strip()
    if not name:
        raise ValueError("expected a file name")
    return name


def _pixels(value: Any) -> int:
    size = int(str(value).strip())
    if size < 0:
        raise ValueError("expected a size in pixels, at least 0")
    return size


#: SDXL size/crop conditioning: in-prompt flag -> key (the command-line flag of the same name gives the default).
SIZE_CONDITIONING_OPTIONS = {"ow": "original_width", "oh": "original_height", "nw": "original_width_negative",
                             "nh": "original_height_negative", "ct": "crop_top", "cl": "crop_left"}


#: In-prompt options of gen_img (`` --x value`` after the prompt).
GEN_IMG_OPTIONS: dict[str, PromptOption] = {
    **{k: SAMPLE_PROMPT_OPTIONS[k] for k in ("n", "w", "h", "s", "l")},
    "d": PromptOption("d", "seeds", _seed_list, "seed(s), comma-separated: one per image of the prompt"),
    "nl": PromptOption("nl", "negative_scale", _negative_scale, "negative scale, or 'none'"),
    "t": PromptOption("t", "strength", _strength, "img2img strength 0..1"),
    "am": PromptOption("am", "multipliers", _float_list, "network multipliers, comma-separated, one per network"),
    "f": PromptOption("f", "file_name", _file_name, "output file name"),
    **{flag: PromptOption(flag, key, _pixels, f"SDXL {key.replace('_', ' ')}")
       for flag, key in SIZE_CONDITIONING_OPTIONS.items()},
}


def parse_gen_line(line: str, args, *, index: int = 0, source: str = "<prompt>") -> SamplePrompt:
    """Parse one gen_img prompt line; defaults come from ``--W --H --steps --scale``."""
    defaults = PromptDefaults(width=args.W, height=args.H, steps=args.steps, scale=args.scale, size_multiple=8,
                              min_size=8)
    return parse_prompt_line(line, defaults=defaults, index=index, source=source, options=GEN_IMG_OPTIONS)


@dataclass(frozen=True)
class ImageJob:
    """One image to generate, fully resolved."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    scale: float
    negative_scale: float | None
    seed: int
    strength: float
    sampler: str
    multipliers: tuple[float, ...] | None = None
    file_name: str | None = None
    init: InitImage | None = None
    size_options: tuple[tuple[str, int], ...] = ()  # SDXL size/crop conditioning given (prompt or flags)

    def batch_key(self) -> tuple:
        """Jobs with equal keys can be denoised in one batch."""
        return (self.width, self.height, self.steps, self.scale, self.negative_scale, self.sampler, self.multipliers,
                self.init is not None, self.init is not None and self.init.mask is not None,
                self.strength)


class SeedSource:
    """Per-image seeds (rule in the module docstring)."""

    def __init__(self, seed: int | None, iter_same_seed: bool) -> None:
        if seed is None and iter_same_seed:
            seed = random.SystemRandom().randrange(2**32)
        self.base = seed
        self.iter_same_seed = iter_same_seed
        self._rng: random.Random = random.Random(seed) if seed is not None else random.SystemRandom()

    def start_iteration(self, iteration: int) -> None:
        if self.iter_same_seed and iteration > 0:
            self._rng = random.Random(self.base)

    def next(self) -> int:
        return self._rng.randrange(2**32)


def _prompt_syntax():
    from library.generation.dynamic_prompts import expand_dynamic_prompt
    from library.generation.prompt_encoding import encode_prompts

    return expand_dynamic_prompt, encode_prompts


def jobs_for_prompt(parsed: SamplePrompt, args, *, seeds: SeedSource, rng: random.Random,
                    init: InitImage | None = None) -> list[ImageJob]:
    """The image jobs of one parsed prompt line: dynamic prompt expanded, ``--images_per_prompt`` each."""
    expand, _ = _prompt_syntax()
    extras = parsed.extras
    prompts = expand(parsed.prompt, rng) if parsed.prompt else [""]
    negatives = expand(parsed.negative_prompt, rng) if parsed.negative_prompt else [""]
    negative = negatives[0] if negatives else ""
    nscale = extras.get("negative_scale", args.negative_scale)
    nscale = None if nscale == "none" else nscale
    strength = extras.get("strength", args.strength)
    width, height = parsed.width, parsed.height
    if init is not None:  # img2img: the init image's size (floored to a multiple of 8)
        width, height = max(8, init.image.width // 8 * 8), max(8, init.image.height // 8 * 8)
    given_seeds = list(extras.get("seeds", ()))
    sizes = ((key, extras.get(key, getattr(args, key, None))) for key in SIZE_CONDITIONING_OPTIONS.values())
    size_options = tuple((key, value) for key, value in sizes if value is not None)
    jobs = []
    for prompt in prompts:
        for k in range(args.images_per_prompt):
            drawn = seeds.next()
            seed = given_seeds[k] if k < len(given_seeds) else drawn
            jobs.append(ImageJob(prompt=prompt, negative_prompt=negative, width=width, height=height,
                                 steps=parsed.steps, scale=parsed.scale, negative_scale=nscale, seed=seed,
                                 strength=strength, sampler=args.sampler, multipliers=extras.get("multipliers"),
                                 file_name=extras.get("file_name"), init=init, size_options=size_options))
    return jobs


def batches(jobs: Sequence[ImageJob], batch_size: int) -> Iterator[list[ImageJob]]:
    """Consecutive jobs with equal settings, at most ``batch_size`` at a time (order kept)."""
    current: list[ImageJob] = []
    for job in jobs:
        if current and (len(current) >= batch_size or job.batch_key() != current[0].batch_key()):
            yield current
            current = []
        current.append(job)
    if current:
        yield current


# --- denoising ------------------------------------------------------------------------------

@dataclass
class GeneratedImage:
    job: ImageJob
    image: Any
    first_pass: Any = None


class ModelParts(NamedTuple):
    """A loaded model; SDXL's ``text_encoder``/``tokenizer`` are lists (``[CLIP-L, bigG]``), as networks take them."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any


#: The pass a conditioning is for: (width, height, scale) of a hires-fix first pass; None = the jobs' own size.
PassSize = tuple[int, int, float] | None


def _rows(cond: Conditioning, start: int, stop: int) -> Conditioning:
    """Batch rows ``start:stop`` of every tensor in ``cond``."""
    def cut(tree):
        if isinstance(tree, torch.Tensor):
            return tree[start:stop]
        return {k: cut(v) for k, v in tree.items()} if isinstance(tree, dict) else tree

    return Conditioning(cond.hidden_states[start:stop], cut(cond.unet_kwargs))


class SDGenerator:
    """Turns batches of :class:`ImageJob` into images with one loaded SD 1.x/2.x model.

    Other families subclass it and override :meth:`load_models`, :meth:`encode_texts`,
    :meth:`_image_conditioning` (conditioning beyond the text), :meth:`png_fields`,
    ``latent_scale`` and ``embedding_keys``.
    """

    latent_scale = LATENT_SCALE
    embedding_keys: tuple[str, ...] | None = None  # textual inversion file keys, one per text encoder (None: SD's)

    def __init__(self, unet, vae, text_encoder, tokenizer, args, *, device: torch.device, dtype: torch.dtype,
                 networks: LoadedNetworks | None = None, embeddings: Embeddings | None = None,
                 controls: Controls | None = None) -> None:
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.args = args
        self.device, self.dtype = device, dtype
        self.networks = networks or LoadedNetworks()
        self.controls = controls or Controls()  # ControlNet / LLLite (library/generation/control.py)
        self.embeddings = embeddings or Embeddings()
        self._text_cache: tuple[tuple[str, ...], Conditioning] | None = None
        _, self._encode_prompts = _prompt_syntax()
        self.sampler = LatentDiffusionSampler(unet, vae, self.encode_texts, latent_scale=self.latent_scale)

    @classmethod
    def load_models(cls, args) -> ModelParts:
        """The models of ``--ckpt`` in float32 on the CPU (raises the loader's errors)."""
        from library.families.sd.loading import load_sd_models

        m = load_sd_models(args.ckpt, v2=args.v2, vae_path=args.vae, tokenizer_cache_dir=args.tokenizer_cache_dir,
                           keep_extras=False)
        return ModelParts(m.unet, m.vae, m.text_encoder, m.tokenizer)

    # text
    def encode_texts(self, texts: list[str]) -> torch.Tensor | Conditioning:
        texts = [self.embeddings.expand(t) for t in texts]
        return self._encode_prompts(self.tokenizer, self.text_encoder, texts,
                                    max_embeddings_multiples=self.args.max_embeddings_multiples,
                                    clip_skip=self.args.clip_skip, emb_normalize_mode=self.args.emb_normalize_mode)

    def _encode(self, texts: list[str], jobs: Sequence[ImageJob], negative: Sequence[bool],
                size: PassSize) -> Conditioning:
        """Conditioning rows for ``texts``; row i is ``jobs[i]``'s image, a negative/uncond row when
        ``negative[i]``. The text part is encoded once for both hires-fix passes."""
        key = tuple(texts)
        if self._text_cache is None or self._text_cache[0] != key:
            cond = Conditioning.coerce(self.encode_texts(texts)).to(self.device, self.dtype)
            self._text_cache = (key, cond)
        return self._image_conditioning(self._text_cache[1], jobs, negative, size)

    def _image_conditioning(self, cond: Conditioning, jobs: Sequence[ImageJob], negative: Sequence[bool],
                            size: PassSize) -> Conditioning:
        """Per-image conditioning beyond the text (SDXL's size ids); SD has none."""
        global _warned_size_options
        if any(j.size_options for j in jobs) and not _warned_size_options:
            logger.warning("--ow/--oh/--nw/--nh/--ct/--cl are SDXL size conditioning: ignored for SD 1.x/2.x "
                           "(add --sdxl for an SDXL model)")
            _warned_size_options = True
        return cond

    def png_fields(self, job: ImageJob) -> dict[str, Any]:
        """Extra PNG text chunks of an image (SDXL: its size conditioning)."""
        return {}

    def _unet_fn(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """One U-Net call, with the residuals of the ControlNets active at this step."""
        extra = self.controls.unet_kwargs(x, t, cond.hidden_states, cond.unet_kwargs)
        if extra:
            cond = Conditioning(cond.hidden_states, {**cond.unet_kwargs, **extra})
        return self.sampler.model_fn(x, t, cond)

    def _conditioning(self, jobs: Sequence[ImageJob], size: PassSize = None):
        """(cond, uncond, model_fn, guidance_scale) for ``sample_latents``; one text-encoder call."""
        j0, b, jobs = jobs[0], len(jobs), list(jobs)
        prompts = [j.prompt for j in jobs]
        negatives = [j.negative_prompt for j in jobs]
        model_fn = self._unet_fn
        if j0.negative_scale is not None:
            # uncond = empty prompt; the negative prompt gets its own scale:
            # pred = u + scale * (cond - u) - negative_scale * (neg - u)
            cond = self._encode([""] * b + negatives + prompts, jobs * 3, [True] * 2 * b + [False] * b, size)
            scale, nscale = j0.scale, j0.negative_scale

            def guided(x, t, cond):
                u, n, c = model_fn(torch.cat([x, x, x]), t, cond).float().chunk(3)
                return u + scale * (c - u) - nscale * (n - u)

            return cond, None, guided, 1.0
        if j0.scale != 1.0:
            both = self._encode(negatives + prompts, jobs * 2, [True] * b + [False] * b, size)
            return _rows(both, b, 2 * b), _rows(both, 0, b), model_fn, j0.scale
        return self._encode(prompts, jobs, [False] * b, size), None, model_fn, 1.0

    # latents
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [B,3,H,W] in [-1,1] -> model-space latents (VAE posterior mean x scale), float32."""
        p = next(self.vae.parameters())
        return self.vae.encode(pixels.to(p.device, p.dtype)).latent_dist.mean.float() * self.latent_scale

    def decode(self, latents: torch.Tensor) -> list:
        return latents_to_images(self.vae, latents, latent_scale=self.latent_scale)

    def _denoise(self, jobs, conditioning, generators, *, width: int, height: int, steps: int,
                 init: torch.Tensor | None = None, strength: float = 1.0, mask: torch.Tensor | None = None,
                 guides: list | None = None, control: bool = True):
        """One denoising pass; ``control=False`` runs it without the ControlNets / LLLite networks."""
        cond, uncond, model_fn, guidance = conditioning
        f = self.sampler.vae_scale_factor
        shape = (len(jobs), self.sampler.latent_channels, height // f, width // f)
        noise = torch.cat([torch.randn((1, *shape[1:]), generator=g, dtype=torch.float32) for g in generators])
        scheduler = make_scheduler(jobs[0].sampler, v_parameterization=self.args.v_parameterization,
                                   zero_terminal_snr=self.args.zero_terminal_snr)
        proxy = SeededScheduler(scheduler, noise, generators, txt2img=init is None, init=init, mask=mask,
                                steps=steps, strength=strength)
        start = init if init is not None else torch.zeros(shape)
        with self.controls.pass_for(guides, width, height, self.device, self.dtype, control=control):
            return sample_latents(model_fn, proxy, shape=shape, steps=steps, cond=cond, uncond=uncond,
                                  guidance_scale=guidance, generator=torch.Generator("cpu").manual_seed(0),
                                  device=self.device, dtype=self.dtype, init_latents=start,
                                  strength=strength if init is not None else 1.0, progress=False,
                                  on_step=self.controls.on_step)

    @torch.no_grad()
    def generate(self, jobs: Sequence[ImageJob]) -> list[GeneratedImage]:
        """Generate a batch of jobs with equal :meth:`ImageJob.batch_key`."""
        j0 = jobs[0]
        self.networks.set_multipliers(j0.multipliers)
        self._text_cache = None  # the multipliers may change the text encoders
        conditioning = self._conditioning(jobs)
        generators = [torch.Generator("cpu").manual_seed(j.seed) for j in jobs]
        guides = self.controls.next_guides(len(jobs))  # image k of the run: guide image k (cycling)
        w, h = j0.width, j0.height
        first = None
        if j0.init is not None:
            pixels = torch.cat([image_to_tensor(j.init.image, w, h) for j in jobs])
            init = self.encode_images(pixels)
            mask = None
            if j0.init.mask is not None:
                f = self.sampler.vae_scale_factor
                mask = torch.cat([mask_to_latent_mask(j.init.mask, w // f, h // f) for j in jobs])
            latents = self._denoise(jobs, conditioning, generators, width=w, height=h, steps=j0.steps, init=init,
                                    strength=j0.strength, mask=mask, guides=guides)
        elif self.args.highres_fix_scale:
            w1, h1 = first_pass_size(w, h, self.args.highres_fix_scale)
            low = self._denoise(jobs, self._conditioning(jobs, (w1, h1, self.args.highres_fix_scale)), generators,
                                width=w1, height=h1, steps=self.args.highres_fix_steps, guides=guides)
            if self.args.highres_fix_save_1st or not self.args.highres_fix_latents_upscaling:
                first = self.decode(low)
            f = self.sampler.vae_scale_factor
            if self.args.highres_fix_latents_upscaling:
                up = F.interpolate(low, size=(h // f, w // f), mode="bilinear", align_corners=False)
            else:
                up = self.encode_images(torch.cat([image_to_tensor(im, w, h) for im in first]))
            latents = self._denoise(jobs, conditioning, generators, width=w, height=h, steps=j0.steps, init=up,
                                    strength=j0.strength, guides=guides,
                                    control=not self.args.highres_fix_disable_control_net)
            if not self.args.highres_fix_save_1st:
                first = None
        else:
            latents = self._denoise(jobs, conditioning, generators, width=w, height=h, steps=j0.steps, guides=guides)
        images = self.decode(latents)
        return [GeneratedImage(j, im, first[i] if first else None) for i, (j, im) in enumerate(zip(jobs, images))]


def first_pass_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """Hires fix first-pass size: ``scale`` x the final size, floored to a multiple of 8 (at least 8)."""
    return max(8, int(width * scale) // 8 * 8), max(8, int(height * scale) // 8 * 8)


# --- the run ----------------------------------------------------------------------------------

def _prompt_lines(args) -> Iterable[tuple[str, str]]:
    if args.prompt is not None:
        return [(args.prompt, "--prompt")]
    if args.from_file:
        path = Path(args.from_file)
        if not path.is_file():
            raise GenerationError(f"--from_file {path}: file not found")
        lines = []
        for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
            if line.strip() and not line.lstrip().startswith("#"):
                lines.append((line.strip(), f"{path.name}:{n}"))
        if not lines:
            raise GenerationError(f"--from_file {path}: no prompts (blank lines and # comments are skipped)")
        return lines
    if args.interactive:
        return ((line.strip(), f"stdin:{n}") for n, line in enumerate(sys.stdin, 1) if line.strip())
    return [("", "<no prompt>")]


def _dtype(args) -> torch.dtype:
    return torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else torch.float32


def load_generator(args, device: torch.device | None = None) -> SDGenerator:
    """Load the model, embeddings and networks named by ``args`` into a generator: the one place
    that picks the model family (:class:`SDGenerator`, or ``SDXLGenerator`` with ``--sdxl``)."""
    from library.families.sd.checkpoint import CheckpointError

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = _dtype(args)
    if not Path(args.ckpt).exists():
        raise GenerationError(f"--ckpt {args.ckpt}: not found (a local .safetensors/.ckpt file or Diffusers folder; "
                              "nothing is downloaded)")
    if args.sdxl:
        from library.generation.sdxl import SDXLGenerator as cls
    else:
        cls = SDGenerator
    try:
        models = cls.load_models(args)
    except (CheckpointError, FileNotFoundError, OSError, ValueError) as e:
        from library.generation.sdxl import family_mismatch

        raise GenerationError(family_mismatch(args.ckpt, sdxl=args.sdxl) or f"--ckpt {args.ckpt}: {e}") from None
    unet, vae, te, tok = models
    try:
        embeddings = load_embeddings(args.textual_inversion_embeddings or [], tok, te, keys=cls.embedding_keys)
        networks = load_networks(args, text_encoder=te, unet=unet, vae=vae)
        controls = load_controls(args, unet=unet, sdxl=args.sdxl)
    except (EmbeddingError, NetworkError, ControlInputError) as e:
        raise GenerationError(str(e)) from None
    vae_dtype = torch.float32 if args.no_half_vae else dtype
    encoders = te if isinstance(te, list) else [te]
    for module, dt in ((unet, dtype), *((e, dtype) for e in encoders), (vae, vae_dtype)):
        module.to(device=device)
        if dt != torch.float32:
            module.to(dtype=dt)
        module.eval().requires_grad_(False)
    networks.to(device, dtype)
    controls.to(device, dtype)
    if args.xformers:
        if importlib.util.find_spec("xformers") is None:
            raise GenerationError("--xformers: the xformers package is not installed (pip install xformers), or drop "
                                  "--xformers: PyTorch SDPA attention is used by default")
        unet.enable_xformers_memory_efficient_attention()
        vae.enable_xformers_memory_efficient_attention()
    return cls(unet, vae, te, tok, args, device=device, dtype=dtype, networks=networks, embeddings=embeddings,
               controls=controls)


def run(args, generator: SDGenerator | None = None) -> list[Path]:
    """Generate everything ``args`` asks for; return the written paths (first-pass images included)."""
    try:
        return _run(args, generator)
    except (PromptFileError, ImageInputError, NetworkError, EmbeddingError, ClipVisionError) as e:
        raise GenerationError(str(e)) from None


def _run(args, generator: SDGenerator | None) -> list[Path]:
    from library.training.validation import check_writable_folder

    check_writable_folder(args.outdir, "--outdir")  # now, not after the model has loaded and drawn a batch
    if args.highres_fix_strength is not None:
        logger.warning("--highres_fix_strength applies to an img2img first pass, which is not supported yet: ignored "
                       "(the second pass uses --strength)")
    if args.highres_fix_disable_control_net and not args.highres_fix_scale:
        logger.warning("--highres_fix_disable_control_net is ignored without --highres_fix_scale (hires fix)")
    if args.clip_vision_strength is not None:
        find_clip_vision_model(args.clip_vision_model)  # a missing model fails now, before the SDXL model loads
    inits = load_init_images(args.image_path, args.mask_path) if args.image_path else []
    lines = _prompt_lines(args)
    interactive = not isinstance(lines, list)
    parsed: list[SamplePrompt] | None = None
    if not interactive:  # check every line before loading anything
        parsed = [parse_gen_line(line, args, index=i, source=src) for i, (line, src) in enumerate(lines)]
    if generator is None:
        generator = load_generator(args)
    else:  # a preloaded model (tests, notebooks): this run's flags apply
        generator.args = args
    if (generator.networks.merged and parsed
            and any("multipliers" in p.extras for p in parsed)):
        raise GenerationError("--am (per-prompt network multipliers) cannot change merged networks: drop "
                              "--network_merge to use --am")

    seeds = SeedSource(args.seed, args.iter_same_seed)
    rng = random.Random(args.seed) if args.seed is not None else random.Random()
    namer = OutputNamer(args.outdir, sequential=args.sequential_file_name, use_original=args.use_original_file_name)
    written: list[Path] = []

    def pairs(prompts: list[SamplePrompt]) -> list[tuple[SamplePrompt, InitImage | None]]:
        if not inits:
            return [(p, None) for p in prompts]
        count = max(len(prompts), len(inits))
        return [(prompts[k % len(prompts)], inits[k % len(inits)]) for k in range(count)]

    def process(jobs: list[ImageJob], bar) -> None:
        for batch in batches(jobs, args.batch_size):
            for out in generator.generate(batch):
                written.extend(_write(out, namer, generator.png_fields(out.job)))
            bar.update(len(batch))

    if interactive:
        with tqdm(desc="images", unit="img") as bar:
            for n, (line, src) in enumerate(lines):
                try:
                    prompt = parse_gen_line(line, args, index=n, source=src)
                    if generator.networks.merged and "multipliers" in prompt.extras:
                        raise NetworkError("--am cannot change merged networks: drop --network_merge")
                except (PromptFileError, NetworkError) as e:
                    logger.error("%s", e)
                    continue
                for it in range(args.n_iter):
                    seeds.start_iteration(it)
                    init = inits[n % len(inits)] if inits else None
                    process(jobs_for_prompt(prompt, args, seeds=seeds, rng=rng, init=init), bar)
        return written

    total = len(pairs(parsed)) * args.images_per_prompt * args.n_iter
    with tqdm(total=total, desc="images", unit="img") as bar:
        for it in range(args.n_iter):
            seeds.start_iteration(it)
            order = list(parsed)
            if args.shuffle_prompts:
                rng.shuffle(order)
            jobs = [job for p, init in pairs(order) for job in jobs_for_prompt(p, args, seeds=seeds, rng=rng, init=init)]
            if len(jobs) != total // args.n_iter:  # enumerated dynamic prompts add images
                bar.total += len(jobs) - total // args.n_iter
            process(jobs, bar)
    logger.info("wrote %d image(s) to %s", len(written), args.outdir)
    return written


def _write(out: GeneratedImage, namer: OutputNamer, extra: dict[str, Any]) -> list[Path]:
    job = out.job
    text = png_text_fields(prompt=job.prompt, seed=job.seed, sampler=job.sampler, steps=job.steps, scale=job.scale,
                           negative_prompt=job.negative_prompt, negative_scale=job.negative_scale, extra=extra)
    original = job.init.path if job.init is not None else None
    paths = []
    if out.first_pass is not None:
        path = namer.next_name(seed=job.seed, file_name=job.file_name, original=original, suffix="_1st")
        paths.append(save_image(out.first_pass, path, text))
    path = namer.next_name(seed=job.seed, file_name=job.file_name, original=original)
    paths.append(save_image(out.image, path, text))
    return paths
