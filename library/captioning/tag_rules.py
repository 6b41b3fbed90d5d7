"""From a tagger's probabilities to the ordered list of tags written for one image.

For the probabilities of one image (one per :class:`~library.captioning.tag_table.Tag`):

* ``general, character, copyright, artist, meta, model`` tags: kept when ``probability >=`` the
  category's threshold (``--general_threshold`` ... default ``--thresh``);
* ``rating`` and ``quality``: only the single most probable tag of the category, and only with
  ``--use_rating_tags`` / ``--use_quality_tags`` (or their ``_as_last_tag`` forms, which imply them);
* ``--undesired_tags``: never written (matched against the written name and the CSV name).

Order: rating, quality (unless ``_as_last_tag``), then the general tags, then character, copyright,
artist, meta and model tags (``--character_tags_first``: character tags before the general ones),
each category in the CSV's order; then quality and rating when ``_as_last_tag`` (the rating tag is
the very last). Finally the ``--always_first_tags`` found are moved to the front, in the order
given. A name written twice (two tags replaced by one name) is kept once, at its first place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from library.captioning.tag_table import Tag

THRESHOLD_CATEGORIES = ("general", "character", "copyright", "artist", "meta", "model")
TOP_ONE_CATEGORIES = ("rating", "quality")


@dataclass(frozen=True)
class TagOptions:
    """The tag-selection flags, resolved (thresholds per category, lists split)."""

    thresholds: dict[str, float] = field(default_factory=lambda: {c: 0.35 for c in THRESHOLD_CATEGORIES})
    use_rating_tags: bool = False
    rating_last: bool = False
    use_quality_tags: bool = False
    quality_last: bool = False
    character_tags_first: bool = False
    undesired: frozenset[str] = frozenset()
    always_first: tuple[str, ...] = ()


def split_tag_list(text: str | None, separator: str = ", ") -> list[str]:
    """``"a, b,c"`` -> ``["a", "b", "c"]``: split at the separator without its spaces, items stripped."""
    if not text:
        return []
    sep = separator.strip() or separator
    return [item.strip() for line in text.splitlines() for item in line.split(sep) if item.strip()]


def thresholds_from(thresh: float, **per_category: float | None) -> dict[str, float]:
    """``{category: threshold}``: each ``<category>_threshold`` given, else ``thresh``."""
    return {c: (per_category.get(c) if per_category.get(c) is not None else thresh) for c in THRESHOLD_CATEGORIES}


def _unique(names: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    return [n for n in names if not (n in seen or seen.add(n))]


def select_tags(probabilities: Sequence[float], tags: Sequence[Tag], options: TagOptions) -> list[str]:
    """The tags written for one image (see the module docstring for the rules and the order)."""
    if len(probabilities) != len(tags):
        raise ValueError(f"{len(probabilities)} probabilities for {len(tags)} tags")
    found: dict[str, list[str]] = {c: [] for c in THRESHOLD_CATEGORIES}
    best: dict[str, tuple[float, Tag]] = {}
    for tag, p in zip(tags, probabilities):
        p = float(p)
        if tag.category in TOP_ONE_CATEGORIES:
            if tag.category not in best or p > best[tag.category][0]:
                best[tag.category] = (p, tag)
        elif p >= options.thresholds[tag.category] and tag.source not in options.undesired:
            found[tag.category] += [n for n in tag.names if n not in options.undesired]

    def top(category: str) -> list[str]:
        if category not in best or best[category][1].source in options.undesired:
            return []
        return [n for n in best[category][1].names if n not in options.undesired]

    use_rating = options.use_rating_tags or options.rating_last
    use_quality = options.use_quality_tags or options.quality_last
    order = ["general", "character", "copyright", "artist", "meta", "model"]
    if options.character_tags_first:
        order.remove("character")
        order.insert(0, "character")
    front = (top("rating") if use_rating and not options.rating_last else [])
    front += top("quality") if use_quality and not options.quality_last else []
    end = top("quality") if options.quality_last else []
    end += top("rating") if options.rating_last else []
    names = _unique(front + [n for c in order for n in found[c]] + end)
    firsts = [n for n in options.always_first if n in names]
    return _unique(firsts + names)


def merge_with_existing(existing: str | None, new_tags: Sequence[str], separator: str = ", ") -> list[str]:
    """``--append_tags``: the tags already in a file, in their order, then the new ones not among them."""
    old = _unique(split_tag_list(existing, separator))
    have = set(old)
    return old + [t for t in new_tags if t not in have]
