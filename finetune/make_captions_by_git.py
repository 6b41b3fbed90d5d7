"""Caption every image of a folder with GIT, writing ``<stem>.caption`` next to each image.

    python finetune/make_captions_by_git.py train_data --batch_size 8 --remove_words
    python finetune/make_captions_by_git.py train_data --model_id models/git-large-textcaps --recursive

The model is a transformers GIT captioner (``AutoProcessor`` + ``AutoModelForCausalLM``, i.e.
``GitForCausalLM``): ``--model_id`` is a Hugging Face repo id (default
``microsoft/git-large-textcaps``, downloaded into the Hugging Face cache on first use) or a folder
written by ``save_pretrained``. Captions are decoded greedily, at most ``--max_length`` tokens
(the start token included). GIT models trained on TextCaps transcribe the text they see;
``--remove_words`` drops those phrases ("a sign that says stop on a pole" -> "a sign on a pole",
rules in ``library/captioning/text_cleanup.py``). Unreadable images are skipped with a warning;
an existing caption file is overwritten. Flags and defaults as kohya-ss/sd-scripts; guide:
docs/captioning.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
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

DEFAULT_MODEL = "microsoft/git-large-textcaps"


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Caption images with GIT (one caption file per image).")
    add_folder_arguments(parser, default_extension=".caption")
    parser.add_argument("--model_id", type=str, default=DEFAULT_MODEL,
                        help=f"GIT captioning model: Hugging Face repo id or save_pretrained folder "
                             f"(default {DEFAULT_MODEL})")
    add_batch_arguments(parser)
    parser.add_argument("--max_length", type=int, default=50, help="longest caption in tokens (default 50)")
    parser.add_argument("--remove_words", action="store_true",
                        help="remove the phrases that transcribe text in the image ('with the words ...', "
                             "'that says ...')")
    add_logging_arguments(parser)
    return parser


def load_git(source: str, device: str):
    """(model, processor) from a repo id or folder; one-line :class:`CaptioningError` when missing."""
    from library.captioning.hf_models import load_pretrained

    def load(where: str, kwargs: dict):
        from transformers import AutoModelForCausalLM, AutoProcessor

        return AutoModelForCausalLM.from_pretrained(where, **kwargs), AutoProcessor.from_pretrained(where, **kwargs)

    model, processor = load_pretrained(source, load, flag="--model_id", what="GIT captioning model",
                                       example=DEFAULT_MODEL, model_type="git")
    return model.to(device).eval(), processor


def git_captioner(model, processor, device: str, *, max_length: int = 50,
                  remove_words: bool = False) -> Callable[[list], list[str]]:
    """``caption(pil_images) -> captions``: greedy decoding, then ``--remove_words`` when asked."""
    import torch

    from library.captioning.text_cleanup import remove_words as clean

    @torch.inference_mode()
    def caption(images: list) -> list[str]:
        pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(device, model.dtype)
        ids = model.generate(pixel_values=pixels, max_length=max_length)
        texts = [text.strip() for text in processor.batch_decode(ids, skip_special_tokens=True)]
        return [clean(text) for text in texts] if remove_words else texts

    return caption


def make_captions_by_git(args: argparse.Namespace):
    """The whole script on parsed flags; returns the :class:`RunReport`."""
    from library.captioning.hf_models import pick_device
    from library.captioning.runner import RunReport, caption_to_files, images_to_caption

    check_batch_arguments(args)
    if args.max_length < 2:
        raise CaptioningError(f"--max_length must be 2 or more (the start token and one word; got {args.max_length})")
    images = images_to_caption(args.train_data_dir, recursive=args.recursive, extension=args.caption_extension)
    if not images:
        return RunReport()
    device = pick_device()
    model, processor = load_git(args.model_id, device)
    caption = git_captioner(model, processor, device, max_length=args.max_length, remove_words=args.remove_words)
    report = caption_to_files(images, caption, extension=args.caption_extension, batch_size=args.batch_size,
                              workers=args.max_data_loader_n_workers, debug=args.debug)
    logger.info("captioned %d image(s), %d skipped", len(report.done), len(report.skipped))
    return report


def main(argv: list[str] | None = None) -> None:
    args = setup_parser().parse_args(argv)
    setup_logging(args)
    with user_errors():
        make_captions_by_git(args)


if __name__ == "__main__":
    main(sys.argv[1:])
