"""Caption every image of a folder with BLIP, writing ``<stem>.caption`` next to each image.

    python finetune/make_captions.py train_data --batch_size 8 --beam_search --num_beams 3
    python finetune/make_captions.py train_data --caption_weights models/blip-large --recursive

The model is a transformers BLIP captioner (``BlipForConditionalGeneration`` + ``BlipProcessor``):
``--caption_weights`` is a Hugging Face repo id (default ``Salesforce/blip-image-captioning-large``,
downloaded into the Hugging Face cache on first use) or a folder written by ``save_pretrained``.
The URL of the original BLIP ``model_large_caption.pth`` (kohya's default) is read as that repo id,
the same model in transformers form. Captions are sampled (nucleus sampling, ``--top_p``) unless
``--beam_search`` (``--num_beams`` beams); ``--max_length`` / ``--min_length`` bound the caption in
tokens, the start token included; ``--seed`` makes sampling repeatable. Unreadable images are
skipped with a warning; an existing caption file is overwritten. Flags and defaults as
kohya-ss/sd-scripts; guide: docs/captioning.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a script (python finetune/...): make the repo importable
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from library.args import add_logging_arguments  # noqa: E402  (torch-free: --help stays instant)
from library.captioning.cli import (add_batch_arguments, add_folder_arguments, check_batch_arguments,  # noqa: E402
                                    user_errors)
from library.captioning.errors import CaptioningError  # noqa: E402
from library.log import setup_logging  # noqa: E402

logger = logging.getLogger(__name__)

DEFAULT_WEIGHTS = "Salesforce/blip-image-captioning-large"
_ORIGINAL_BLIP_CHECKPOINT = "model_large_caption"  # the .pth the original BLIP repo (and kohya) defaults to


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Caption images with BLIP (one caption file per image).")
    add_folder_arguments(parser, default_extension=".caption")
    parser.add_argument("--caption_weights", type=str, default=DEFAULT_WEIGHTS,
                        help=f"BLIP captioning model: Hugging Face repo id or save_pretrained folder "
                             f"(default {DEFAULT_WEIGHTS})")
    add_batch_arguments(parser)
    parser.add_argument("--beam_search", action="store_true",
                        help="beam search (--num_beams beams) instead of nucleus sampling")
    parser.add_argument("--num_beams", type=int, default=1, help="beams with --beam_search (default 1)")
    parser.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling probability mass (default 0.9)")
    parser.add_argument("--max_length", type=int, default=75, help="longest caption in tokens (default 75)")
    parser.add_argument("--min_length", type=int, default=5, help="shortest caption in tokens (default 5)")
    parser.add_argument("--seed", type=int, default=42, help="random seed for sampling (default 42)")
    add_logging_arguments(parser)
    return parser


@dataclass(frozen=True)
class BlipSettings:
    """How captions are generated (the generation flags, checked)."""

    beam_search: bool = False
    num_beams: int = 1
    top_p: float = 0.9
    max_length: int = 75
    min_length: int = 5

    def __post_init__(self):
        if self.num_beams < 1:
            raise CaptioningError(f"--num_beams must be 1 or more (got {self.num_beams})")
        if not 0 < self.top_p <= 1:
            raise CaptioningError(f"--top_p must be in (0, 1] (got {self.top_p})")
        if self.min_length < 0 or self.max_length < max(self.min_length, 2):
            raise CaptioningError(f"--max_length {self.max_length} / --min_length {self.min_length}: need "
                                  "0 <= min_length <= max_length and max_length >= 2")

    def generate_kwargs(self) -> dict:
        kwargs = {"max_length": self.max_length, "min_length": self.min_length}
        if self.beam_search:
            return {**kwargs, "num_beams": self.num_beams, "do_sample": False}
        return {**kwargs, "do_sample": True, "top_p": self.top_p, "top_k": 0, "num_beams": 1}


def weights_source(value: str) -> str:
    """The repo id / folder to load: the original BLIP ``.pth`` URL maps to its transformers repo."""
    if value.lower().startswith(("http://", "https://")) or value.lower().endswith(".pth"):
        if _ORIGINAL_BLIP_CHECKPOINT in value:
            logger.info("--caption_weights %s: loading %s, the same BLIP model in transformers form", value,
                        DEFAULT_WEIGHTS)
            return DEFAULT_WEIGHTS
        raise CaptioningError(f"--caption_weights {value}: original-BLIP .pth checkpoints are not read; give a "
                              f"transformers BLIP model (a repo id such as {DEFAULT_WEIGHTS} or a save_pretrained "
                              "folder)")
    return value


def load_blip(source: str, device: str):
    """(model, processor) from a repo id or folder; one-line :class:`CaptioningError` when missing."""
    from library.captioning.hf_models import load_pretrained

    def load(where: str, kwargs: dict):
        from transformers import BlipForConditionalGeneration, BlipProcessor

        model = BlipForConditionalGeneration.from_pretrained(where, **kwargs)
        return model, BlipProcessor.from_pretrained(where, **kwargs)

    model, processor = load_pretrained(source, load, flag="--caption_weights", what="BLIP captioning model",
                                       example=DEFAULT_WEIGHTS, model_type="blip")
    return model.to(device).eval(), processor


def blip_captioner(model, processor, device: str, settings: BlipSettings) -> Callable[[list], list[str]]:
    """``caption(pil_images) -> captions`` with ``settings``."""
    import torch

    kwargs = settings.generate_kwargs()

    @torch.inference_mode()
    def caption(images: list) -> list[str]:
        pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(device, model.dtype)
        ids = model.generate(pixel_values=pixels, **kwargs)
        return [text.strip() for text in processor.batch_decode(ids, skip_special_tokens=True)]

    return caption


def make_captions(args: argparse.Namespace):
    """The whole script on parsed flags; returns the :class:`RunReport`."""
    import torch

    from library.captioning.hf_models import pick_device
    from library.captioning.runner import RunReport, caption_to_files, images_to_caption

    check_batch_arguments(args)
    settings = BlipSettings(beam_search=args.beam_search, num_beams=args.num_beams, top_p=args.top_p,
                            max_length=args.max_length, min_length=args.min_length)
    source = weights_source(args.caption_weights)
    images = images_to_caption(args.train_data_dir, recursive=args.recursive, extension=args.caption_extension)
    if not images:
        return RunReport()
    device = pick_device()
    model, processor = load_blip(source, device)
    torch.manual_seed(args.seed)
    caption = blip_captioner(model, processor, device, settings)
    report = caption_to_files(images, caption, extension=args.caption_extension, batch_size=args.batch_size,
                              workers=args.max_data_loader_n_workers, debug=args.debug)
    logger.info("captioned %d image(s), %d skipped", len(report.done), len(report.skipped))
    return report


def main(argv: list[str] | None = None) -> None:
    args = setup_parser().parse_args(argv)
    setup_logging(args)
    with user_errors():
        make_captions(args)


if __name__ == "__main__":
    main(sys.argv[1:])
