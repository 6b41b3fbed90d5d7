"""Tidy the captions and tags of a fine-tuning metadata JSON.

    python finetune/clean_captions_and_tags.py meta_cap_dd.json meta_clean.json

Same positional arguments as kohya-ss/sd-scripts (``in_json out_json [--debug]``; the old form
with a leading ``train_data_dir`` still works, with a warning, and the folder is ignored). The
rules are ours (the reference's are a list of anime-specific regexes): small, deterministic and
idempotent -- cleaning a cleaned file changes nothing.

Captions (``caption``), line by line (several lines are wildcard alternatives and stay separate):

1. whitespace runs (tabs, non-breaking and ideographic spaces too) become one space; lines are
   stripped; blank lines are dropped;
2. spaces before a comma are removed, runs of commas become one, and commas at the start or end
   of a line are removed (``"a cat ,, sitting ,"`` -> ``"a cat, sitting"``);
3. a leading ``a|an|the picture|photo|photograph|image of`` (any case; several in a row too) is
   removed when text follows it (``"A photo of a cat"`` -> ``"a cat"``; ``"a photo of"`` alone
   stays).

Tags (``tags``):

1. split at commas and line breaks;
2. whitespace inside a tag collapsed to one space, each tag stripped;
3. empty tags dropped (``"a,,b,"``);
4. repeated tags dropped, the first occurrence kept (exact match after step 2, so ``long hair``
   and ``long_hair`` are two tags);
5. joined with ``", "``.

Other fields, and values that are not strings, are left alone. ``out_json`` may be ``in_json``
(the file is replaced atomically once cleaned).
"""

from __future__ import annotations

import argparse
import copy
import logging
import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python finetune/...): make the repo importable
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from finetune.metadata_io import Metadata, read_metadata, write_metadata  # noqa: E402  (torch-free)
from library.args import add_logging_arguments  # noqa: E402
from library.log import setup_logging  # noqa: E402

logger = logging.getLogger(__name__)

_WHITESPACE = re.compile(r"\s+")  # str patterns: Unicode whitespace (\xa0, \u3000 ...) included
_COMMAS = re.compile(r"\s*,(?:\s*,)*")  # a comma, the spaces before it and any commas right after
# All consecutive leading phrases at once ("a photo of an image of x"), so cleaning is idempotent.
_LEADING_PHRASE = re.compile(r"^(?:(?:a|an|the) (?:picture|photo|photograph|image) of )+(?=\S)", re.IGNORECASE)
_TAG_SEPARATORS = re.compile(r"[,\r\n]")


def clean_caption_line(line: str) -> str:
    """Caption rules 1-3 on one line (see the module docstring)."""
    line = _WHITESPACE.sub(" ", line).strip()
    line = _COMMAS.sub(",", line).strip(", ")
    return _LEADING_PHRASE.sub("", line)


def clean_caption(caption: str) -> str:
    """The cleaned caption: every line cleaned, blank lines dropped, lines joined with ``\\n``."""
    lines = (clean_caption_line(line) for line in caption.splitlines())
    return "\n".join(line for line in lines if line)


def clean_tags(tags: str) -> str:
    """The cleaned tag list (tag rules 1-5)."""
    seen: dict[str, None] = {}  # insertion-ordered set: the first occurrence wins
    for tag in _TAG_SEPARATORS.split(tags):
        tag = _WHITESPACE.sub(" ", tag).strip()
        if tag:
            seen.setdefault(tag, None)
    return ", ".join(seen)


def clean_metadata(metadata: Metadata, *, debug: bool = False) -> tuple[Metadata, list[str]]:
    """(a cleaned copy of ``metadata``, the keys whose caption or tags changed); the input is not modified."""
    cleaned = copy.deepcopy(metadata)
    changed: list[str] = []
    for key, entry in cleaned.items():
        before = (entry.get("caption"), entry.get("tags"))
        if isinstance(before[0], str):
            entry["caption"] = clean_caption(before[0])
        if isinstance(before[1], str):
            entry["tags"] = clean_tags(before[1])
        after = (entry.get("caption"), entry.get("tags"))
        if after != before:
            changed.append(key)
            if debug:
                logger.info("%s: caption %r -> %r, tags %r -> %r", key, before[0], after[0], before[1], after[1])
    return cleaned, changed


def clean_captions_and_tags(in_json: str | Path, out_json: str | Path, *, debug: bool = False) -> list[str]:
    """Read ``in_json``, clean it, write ``out_json``; returns the keys that changed."""
    metadata = read_metadata(Path(in_json))
    cleaned, changed = clean_metadata(metadata, debug=debug)
    missing = [k for k, e in cleaned.items() if not e.get("caption") and not e.get("tags")]
    if missing:
        logger.warning("%d entries have neither caption nor tags (training gives them an empty caption), e.g. %r",
                       len(missing), missing[0])
    write_metadata(Path(out_json), cleaned)
    logger.info("cleaned %d of %d entries", len(changed), len(cleaned))
    return changed


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Clean the captions and tags of a fine-tuning metadata JSON.")
    parser.add_argument("in_json", type=str, help="metadata JSON to read")
    parser.add_argument("out_json", type=str, help="metadata JSON to write (may be in_json)")
    parser.add_argument("--debug", action="store_true", help="log every entry that changes, before and after")
    add_logging_arguments(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``in_json out_json``, also accepting the old ``train_data_dir in_json out_json`` form."""
    parser = setup_parser()
    args, unknown = parser.parse_known_args(argv)
    args.train_data_dir = None
    if len(unknown) == 1 and not unknown[0].startswith("-"):
        # The reference's old three-argument form; the folder was never needed.
        args.train_data_dir, args.in_json, args.out_json = args.in_json, args.out_json, unknown[0]
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(args)
    if args.train_data_dir is not None:
        logger.warning("train_data_dir %s is not used and will not be accepted in the future: give only "
                       "in_json and out_json", args.train_data_dir)
    from library.data.errors import DatasetError

    try:
        clean_captions_and_tags(args.in_json, args.out_json, debug=args.debug)
    except DatasetError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
