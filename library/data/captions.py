"""Captions: reading caption files, the per-sample caption transformations, tag frequency.

Per-sample processing (:func:`process_caption`) applies, in this order:

1. ``caption_prefix`` / ``caption_suffix`` (joined with a space) -- to every line of a
   multi-line caption, so whichever line the wildcard step picks carries them;
2. caption dropout: the whole caption becomes "" with probability ``caption_dropout_rate``, or in
   every epoch that is a multiple of ``caption_dropout_every_n_epochs`` (epochs count from 1);
3. wildcards (``enable_wildcard``): one random line of a multi-line caption, then every ``{a|b|c}``
   replaced by one random alternative; ``{{`` and ``}}`` stand for literal braces;
4. when shuffling, tag dropout or token warmup is on, or the caption contains
   ``keep_tokens_separator``: split into a fixed head (the first ``keep_tokens`` tags, or the text
   before ``keep_tokens_separator``), the flexible tags, and an optional fixed tail (after a second
   ``keep_tokens_separator``); keep only the first tags of the flexible part during token warmup;
   shuffle it; drop each flexible tag with ``caption_tag_dropout_rate``; re-join with ", ";
5. ``secondary_separator`` replaced by ``caption_separator`` (grouped tags move as one tag in 4);
6. literal replacements (textual inversion token strings), in insertion order; the key ``""``
   replaces the whole caption (by a random entry when the value is a list: textual inversion
   templates).

All randomness comes from the ``random.Random`` the caller passes in: the dataset seeds it from
(seed, epoch, batch index, position), so a caption is reproducible whatever process builds it.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from library.data.errors import DatasetError


@dataclass(frozen=True)
class CaptionOptions:
    """Caption settings of one subset (see the module docstring for what each does)."""

    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0


@dataclass(frozen=True)
class TrainingPosition:
    """Where training is: epoch counts from 1, step from 0 (optimizer steps done so far)."""

    epoch: int = 1
    step: int = 0
    max_train_steps: int = 0


# ------------------------------------------------------------------------------------ reading


def read_caption_file(path: Path, *, enable_wildcard: bool = False) -> str:
    """Return the caption stored in ``path``.

    The file must be UTF-8 (a BOM is accepted) and hold at least one non-blank line. Without
    wildcards only the first non-blank line is the caption; with them all non-blank lines are
    kept (joined by "\\n") and one is picked per sample.
    """
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(
            f"caption file {path} is not UTF-8 (invalid byte at offset {e.start}): re-save it with UTF-8 encoding"
        ) from e
    except OSError as e:
        raise DatasetError(f"cannot read caption file {path}: {e.strerror or e}") from e
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise DatasetError(
            f"caption file {path} is empty: write the caption into it, or delete it to use the subset's class_tokens"
        )
    return "\n".join(lines) if enable_wildcard else lines[0]


def split_tags(text: str, separator: str) -> list[str]:
    """Tags of ``text`` split at ``separator``, stripped, empty ones removed."""
    return [tag.strip() for tag in text.split(separator) if tag.strip()]


def tag_frequency(captions: Iterable[str], separator: str = ",") -> dict[str, int]:
    """How often each tag occurs over raw captions (every line of multi-line captions counts).

    Used for the ``ss_tag_frequency`` metadata, one dict per image folder, counted per image
    (repeats do not multiply the counts). Keys keep first-seen order.
    """
    counts: Counter[str] = Counter()
    for caption in captions:
        for line in caption.split("\n"):
            counts.update(split_tags(line, separator))
    return dict(counts)


# ------------------------------------------------------------------------------- processing

_OPEN_ESCAPE, _CLOSE_ESCAPE = "\x00", "\x01"  # placeholders: control characters never in captions
_CHOICE = re.compile(r"\{([^{}]*)\}")


def expand_wildcards(text: str, rng: random.Random) -> str:
    """Replace each ``{a|b|c}`` by one alternative, left to right; ``{{``/``}}`` are literal braces."""
    text = text.replace("{{", _OPEN_ESCAPE).replace("}}", _CLOSE_ESCAPE)
    text = _CHOICE.sub(lambda m: rng.choice(m.group(1).split("|")), text)
    return text.replace(_OPEN_ESCAPE, "{").replace(_CLOSE_ESCAPE, "}")


def token_warmup_count(num_flex: int, opts: CaptionOptions, pos: TrainingPosition) -> int:
    """How many flexible tags are used at ``pos.step`` while token warmup is running.

    Grows linearly from ``token_warmup_min`` at step 0 to all tags at ``token_warmup_step``
    (a value below 1 is a fraction of ``max_train_steps``).
    """
    warmup_steps = opts.token_warmup_step
    if 0 < warmup_steps < 1:
        warmup_steps = math.floor(warmup_steps * pos.max_train_steps)
    if warmup_steps <= 0 or pos.step >= warmup_steps:
        return num_flex
    count = opts.token_warmup_min + math.floor(pos.step * (num_flex - opts.token_warmup_min) / warmup_steps)
    return max(0, min(num_flex, count))


def _with_prefix_suffix(caption: str, opts: CaptionOptions) -> str:
    def one(line: str) -> str:
        if opts.caption_prefix:
            line = f"{opts.caption_prefix} {line}"
        if opts.caption_suffix:
            line = f"{line} {opts.caption_suffix}"
        return line

    return "\n".join(one(line) for line in caption.split("\n"))


def _drop_caption(opts: CaptionOptions, rng: random.Random, pos: TrainingPosition) -> bool:
    # The rate draw is made only when a rate is set so that turning dropout off does not shift
    # the random choices of the later steps.
    if opts.caption_dropout_rate > 0 and rng.random() < opts.caption_dropout_rate:
        return True
    every = opts.caption_dropout_every_n_epochs
    return every > 0 and pos.epoch % every == 0


def _rearrange_tags(caption: str, opts: CaptionOptions, rng: random.Random, pos: TrainingPosition) -> str:
    sep = opts.caption_separator
    marker = opts.keep_tokens_separator
    suffix: list[str] = []
    if marker and marker in caption:
        head, rest = caption.split(marker, 1)
        if marker in rest:
            rest, tail = rest.split(marker, 1)
            suffix = split_tags(tail, sep)
        fixed, flex = split_tags(head, sep), split_tags(rest, sep)
    else:
        tags = split_tags(caption, sep)
        keep = max(0, opts.keep_tokens)
        fixed, flex = tags[:keep], tags[keep:]

    flex = flex[: token_warmup_count(len(flex), opts, pos)]
    if opts.shuffle_caption:
        rng.shuffle(flex)
    if opts.caption_tag_dropout_rate > 0:
        flex = [tag for tag in flex if rng.random() >= opts.caption_tag_dropout_rate]
    return ", ".join(fixed + flex + suffix)


def process_caption(caption: str, opts: CaptionOptions, rng: random.Random, pos: TrainingPosition,
                    replacements: Mapping[str, str | Sequence[str]] | None = None) -> str:
    """The caption one sample trains on (processing order in the module docstring)."""
    caption = _with_prefix_suffix(caption, opts)
    if _drop_caption(opts, rng, pos):
        return ""
    if opts.enable_wildcard:
        lines = [line for line in caption.split("\n") if line.strip()]
        caption = rng.choice(lines) if len(lines) > 1 else (lines[0] if lines else "")
        caption = expand_wildcards(caption, rng)
    rearrange = (opts.shuffle_caption or opts.caption_tag_dropout_rate > 0 or opts.token_warmup_step > 0
                 or (opts.keep_tokens_separator and opts.keep_tokens_separator in caption))
    if rearrange:
        caption = _rearrange_tags(caption, opts, rng, pos)
    if opts.secondary_separator:
        caption = caption.replace(opts.secondary_separator, opts.caption_separator)
    for old, new in (replacements or {}).items():
        if old == "":  # the whole caption: ``new``, or a random entry of a list (textual inversion templates)
            caption = new if isinstance(new, str) else rng.choice(list(new))
        else:
            caption = caption.replace(old, new)
    return caption
