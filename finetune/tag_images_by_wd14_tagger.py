"""Tag every image of a folder with a WD14-style tagger (ONNX), writing ``<stem>.txt`` next to each image.

    python finetune/tag_images_by_wd14_tagger.py train_data --onnx --batch_size 8 --thresh 0.35
    python finetune/tag_images_by_wd14_tagger.py train_data --repo_id SmilingWolf/wd-vit-tagger-v3 \
        --use_rating_tags --character_tags_first --remove_underscore --output_path tags.jsonl

The tagger is ``model.onnx`` + ``selected_tags.csv``, taken from ``--model_dir`` when that folder
holds them, else from ``<model_dir>/<repo_id>`` (downloaded there from the Hugging Face repo
``--repo_id`` on first use, or again with ``--force_download``). It runs with onnxruntime, an
optional extra (``pip install onnxruntime``; ``onnxruntime-gpu`` for CUDA); ``--onnx`` is
accepted and always on (Keras/TensorFlow taggers are not supported).

Which tags are written and in which order: ``library/captioning/tag_rules.py`` (thresholds, rating
and quality tags, ``--undesired_tags``, ``--character_tags_first``, ``--always_first_tags``); how
names are written: ``library/captioning/tag_table.py`` (``--remove_underscore``,
``--tag_replacement``, ``--character_tag_expand``). Tags are joined with ``--caption_separator``.
``--append_tags`` keeps the tags already in the file and adds the new ones after them (none twice).
``--output_path x.json|x.jsonl`` writes all images into one file instead
(``library/captioning/tag_outputs.py``). An image for which no tag is found gets no file (training
refuses an empty caption file). Flags and defaults as kohya-ss/sd-scripts; guide: docs/captioning.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python finetune/...): make the repo importable
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from library.args import add_logging_arguments  # noqa: E402  (torch-free: --help stays instant)
from library.captioning.cli import (add_batch_arguments, add_folder_arguments, check_batch_arguments,  # noqa: E402
                                    user_errors)
from library.log import setup_logging  # noqa: E402

logger = logging.getLogger(__name__)

DEFAULT_REPO_ID = "SmilingWolf/wd-v1-4-convnext-tagger-v2"
DEFAULT_MODEL_DIR = "wd14_tagger_model"


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Tag images with a WD14-style ONNX tagger (one tag file per image).")
    add_folder_arguments(parser, default_extension=".txt", what="tag")
    g = parser.add_argument_group("model")
    g.add_argument("--repo_id", type=str, default=DEFAULT_REPO_ID,
                   help=f"Hugging Face repo of the tagger (model.onnx + selected_tags.csv; default {DEFAULT_REPO_ID})")
    g.add_argument("--model_dir", type=str, default=DEFAULT_MODEL_DIR,
                   help="folder holding model.onnx + selected_tags.csv, or where --repo_id is downloaded to "
                        f"(<model_dir>/<repo_id>; default {DEFAULT_MODEL_DIR})")
    g.add_argument("--force_download", action="store_true", help="download --repo_id again even if present")
    g.add_argument("--onnx", action="store_true", help="run the ONNX model (always on; accepted for compatibility)")
    add_batch_arguments(parser)
    g = parser.add_argument_group("thresholds")
    g.add_argument("--thresh", type=float, default=0.35, help="probability a tag needs to be written (default 0.35)")
    for category in ("general", "character", "meta", "model", "copyright", "artist"):
        g.add_argument(f"--{category}_threshold", type=float, default=None,
                       help=f"threshold for {category} tags (default --thresh)")
    g = parser.add_argument_group("tags written")
    g.add_argument("--use_rating_tags", action="store_true", help="write the most probable rating tag first")
    g.add_argument("--use_rating_tags_as_last_tag", action="store_true", help="write the rating tag last")
    g.add_argument("--use_quality_tags", action="store_true",
                   help="write the most probable quality tag first (taggers with a quality category)")
    g.add_argument("--use_quality_tags_as_last_tag", action="store_true", help="write the quality tag last")
    g.add_argument("--character_tags_first", action="store_true", help="character tags before general tags")
    g.add_argument("--always_first_tags", type=str, default=None,
                   help="tags moved to the front when found, in this order ('1girl, 1boy')")
    g.add_argument("--undesired_tags", type=str, default="", help="tags never written ('a, b')")
    g.add_argument("--remove_underscore", action="store_true",
                   help="'_' -> ' ' in tags longer than 3 characters (emoticons like ^_^ kept)")
    g.add_argument("--tag_replacement", type=str, default=None,
                   help=r"rename tags: 'source,replacement;source2,replacement2' (\, and \; are literal)")
    g.add_argument("--character_tag_expand", action="store_true",
                   help="write the character tag 'name_(series)' as 'name, series'")
    g.add_argument("--caption_separator", type=str, default=", ", help="text between tags (default ', ')")
    g = parser.add_argument_group("output")
    g.add_argument("--append_tags", action="store_true",
                   help="keep the tags already in the file and add the new ones after them")
    g.add_argument("--output_path", type=str, default=None,
                   help="write all tags into this .json or .jsonl file instead of one file per image")
    g.add_argument("--frequency_tags", action="store_true", help="log how many images got each tag")
    add_logging_arguments(parser)
    return parser


@dataclass
class TagReport:
    """What a run did: tags by image (the text written), images without tags, unreadable images skipped."""

    tags: dict[Path, str] = field(default_factory=dict)
    untagged: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    frequency: Counter = field(default_factory=Counter)


def tag_options(args: argparse.Namespace):
    """The :class:`TagOptions` and :class:`NameRules` of the flags (errors before any model is loaded)."""
    from library.captioning.tag_rules import TagOptions, split_tag_list, thresholds_from
    from library.captioning.tag_table import NameRules, parse_tag_replacement

    sep = args.caption_separator
    options = TagOptions(
        thresholds=thresholds_from(args.thresh, general=args.general_threshold, character=args.character_threshold,
                                   meta=args.meta_threshold, model=args.model_threshold,
                                   copyright=args.copyright_threshold, artist=args.artist_threshold),
        use_rating_tags=args.use_rating_tags, rating_last=args.use_rating_tags_as_last_tag,
        use_quality_tags=args.use_quality_tags, quality_last=args.use_quality_tags_as_last_tag,
        character_tags_first=args.character_tags_first,
        undesired=frozenset(split_tag_list(args.undesired_tags, sep)),
        always_first=tuple(split_tag_list(args.always_first_tags, sep)))
    rules = NameRules(remove_underscore=args.remove_underscore,
                      replacements=parse_tag_replacement(args.tag_replacement),
                      character_tag_expand=args.character_tag_expand)
    return options, rules


def load_tagger(args: argparse.Namespace, rules):
    """(the onnx tagger, its tags): onnxruntime checked first, so nothing is downloaded in vain."""
    from library.captioning.errors import CaptioningError
    from library.captioning.onnx_tagger import OnnxTagger, import_onnxruntime
    from library.captioning.tag_table import build_tags, read_tag_csv
    from library.captioning.tagger_files import MODEL_FILE, TAGS_FILE, find_tagger_files

    import_onnxruntime()
    folder = find_tagger_files(args.repo_id, args.model_dir, force_download=args.force_download)
    tags = build_tags(read_tag_csv(folder / TAGS_FILE), rules)
    tagger = OnnxTagger(folder / MODEL_FILE)
    if tagger.num_tags is not None and tagger.num_tags != len(tags):
        raise CaptioningError(f"{folder / MODEL_FILE} gives {tagger.num_tags} probabilities but {folder / TAGS_FILE} "
                              f"lists {len(tags)} tags: the two files are not of one tagger")
    return tagger, tags


def tag_images(args: argparse.Namespace) -> TagReport:
    """The whole script on parsed flags; returns the :class:`TagReport`."""
    import numpy as np

    from library.captioning.caption_files import drop_shared_outputs
    from library.captioning.errors import CaptioningError
    from library.captioning.images import find_images, load_rgb
    from library.captioning.onnx_tagger import preprocess
    from library.captioning.runner import run_over_images
    from library.captioning.tag_outputs import TagFiles, TagOutputFile, log_frequency
    from library.captioning.tag_rules import merge_with_existing, select_tags

    check_batch_arguments(args)
    options, rules = tag_options(args)
    sep = args.caption_separator
    sink = TagOutputFile(Path(args.output_path)) if args.output_path else TagFiles(args.caption_extension)
    images = find_images(args.train_data_dir, recursive=args.recursive)
    if not args.output_path:
        images = drop_shared_outputs(images, args.caption_extension)
    logger.info("found %d images in %s%s", len(images), args.train_data_dir, " (recursive)" if args.recursive else "")
    report = TagReport()
    if not images:
        logger.warning("no images in %s%s", args.train_data_dir,
                       "" if args.recursive else " (sub-folders need --recursive)")
        return report
    tagger, tags = load_tagger(args, rules)

    def infer(arrays: list) -> np.ndarray:
        probs = tagger(np.stack(arrays))
        if probs.shape[1] != len(tags):
            raise CaptioningError(f"the tagger gives {probs.shape[1]} probabilities but its tag list has {len(tags)} "
                                  "tags: the two files are not of one tagger")
        return probs

    def store(image: Path, probs: np.ndarray) -> None:
        found = select_tags(probs, tags, options)
        report.frequency.update(found)
        existing = sink.existing(image) if args.append_tags else None
        written = merge_with_existing(existing, found, sep) if existing else found
        if not written:
            report.untagged.append(image)
            return
        text = sep.join(written)
        sink.put(image, text)
        report.tags[image] = text
        if args.debug:
            logger.info("%s: %s", image.name, text)

    run = run_over_images(images, lambda p: preprocess(load_rgb(p), tagger.input_size), infer, store,
                          batch_size=args.batch_size, workers=args.max_data_loader_n_workers, desc="tagging")
    report.skipped = run.skipped
    sink.finish()
    if report.untagged:
        logger.warning("%d image(s) got no tag above the thresholds; no tags written for them: %s",
                       len(report.untagged),
                       ", ".join(p.name for p in report.untagged[:5]) + (" ..." if len(report.untagged) > 5 else ""))
    if args.frequency_tags:
        log_frequency(report.frequency)
    logger.info("tagged %d image(s), %d without tags, %d skipped", len(report.tags), len(report.untagged),
                len(report.skipped))
    return report


def main(argv: list[str] | None = None) -> None:
    args = setup_parser().parse_args(argv)
    setup_logging(args)
    with user_errors():
        tag_images(args)


if __name__ == "__main__":
    main(sys.argv[1:])
