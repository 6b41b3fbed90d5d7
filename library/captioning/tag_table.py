"""A tagger's tag list (``selected_tags.csv``) and the flags that change the names written.

``selected_tags.csv`` has one row per model output, in output order, with the columns
``tag_id,name,category,count`` (only ``name`` and ``category`` are read). ``category`` is a
Danbooru category code -- 0 general, 1 artist, 3 copyright, 4 character, 5 meta, 9 rating -- or one
of the names ``general, artist, copyright, character, meta, rating, quality, model`` (for taggers
with their own categories). Unknown codes are read as general tags, with a warning.

The name each output is written as comes from three flags, applied in this order:

1. ``--remove_underscore``: ``_`` becomes a space in names longer than 3 characters (so ``^_^``
   and other emoticons stay as they are);
2. ``--tag_replacement "a,b;c,d"``: the name ``a`` is written as ``b`` and ``c`` as ``d`` (names as
   after step 1; ``\\,`` and ``\\;`` stand for a literal comma / semicolon; an empty replacement
   drops the tag);
3. ``--character_tag_expand``: a character name ``name_(series)`` (or ``name (series)``) is written
   as the two tags ``name`` and ``series``.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path

from library.captioning.errors import CaptioningError

logger = logging.getLogger(__name__)

CATEGORY_CODES = {0: "general", 1: "artist", 3: "copyright", 4: "character", 5: "meta", 9: "rating"}
CATEGORIES = ("general", "artist", "copyright", "character", "meta", "rating", "quality", "model")


@dataclass(frozen=True)
class Tag:
    """One model output: its column, its name in the CSV, the name(s) written for it, its category."""

    index: int
    source: str
    names: tuple[str, ...]
    category: str


@dataclass(frozen=True)
class NameRules:
    """The three name flags (see the module docstring)."""

    remove_underscore: bool = False
    replacements: dict[str, str] = field(default_factory=dict)
    character_tag_expand: bool = False

    def base_name(self, source: str) -> str:
        """The name after ``--remove_underscore`` (what ``--tag_replacement`` sources are matched against)."""
        return source.replace("_", " ") if self.remove_underscore and len(source) > 3 else source

    def names_for(self, source: str, category: str) -> tuple[str, ...]:
        name = self.base_name(source)
        name = self.replacements.get(name, name)
        if not name:
            return ()
        if self.character_tag_expand and category == "character":
            return expand_character(name)
        return (name,)


def expand_character(name: str) -> tuple[str, ...]:
    """``hatsune_miku_(vocaloid)`` -> (``hatsune_miku``, ``vocaloid``); other names unchanged."""
    if not name.endswith(")") or "(" not in name:
        return (name,)
    cut = name.rfind("(")
    character, series = name[:cut].rstrip("_ "), name[cut + 1 : -1].strip("_ ")
    return (character, series) if character and series else (name,)


def parse_tag_replacement(text: str | None) -> dict[str, str]:
    """``"a,b;c,d"`` -> ``{"a": "b", "c": "d"}``; ``\\,`` / ``\\;`` are literal. Raises :class:`CaptioningError`."""
    if not text:
        return {}
    pairs: list[list[str]] = [[""]]
    chars = iter(text)
    for ch in chars:
        if ch == "\\":
            escaped = next(chars, "\\")
            pairs[-1][-1] += escaped if escaped in ",;\\" else "\\" + escaped
        elif ch == ",":
            pairs[-1].append("")
        elif ch == ";":
            pairs.append([""])
        else:
            pairs[-1][-1] += ch
    replacements: dict[str, str] = {}
    for parts in pairs:
        if len(parts) == 1 and not parts[0].strip():
            continue  # an empty item ("a,b;" or ";;") is ignored
        if len(parts) != 2 or not parts[0].strip():
            shown = ",".join(parts)
            raise CaptioningError(f"--tag_replacement: {shown!r} is not 'source,replacement' (pairs are separated "
                                  r"by ';'; write \, or \; for a literal comma or semicolon)")
        replacements[parts[0].strip()] = parts[1].strip()
    return replacements


def _category(value: str, path: Path, line: int, unknown: dict[str, int]) -> str:
    text = value.strip().lower()
    if text in CATEGORIES:
        return text
    try:
        code = int(text)
    except ValueError:
        raise CaptioningError(f"{path} line {line}: category {value!r} is neither a number nor one of "
                              f"{', '.join(CATEGORIES)}") from None
    if code not in CATEGORY_CODES:
        unknown[text] = unknown.get(text, 0) + 1
        return "general"
    return CATEGORY_CODES[code]


def read_tag_csv(path: Path) -> list[tuple[str, str]]:
    """``[(name, category), ...]`` from ``selected_tags.csv`` in row (= model output) order."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as e:
        raise CaptioningError(f"cannot read the tag list {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise CaptioningError(f"tag list {path} is not UTF-8 (invalid byte at offset {e.start})") from e
    reader = csv.DictReader(text.splitlines())
    columns = [c.strip() for c in reader.fieldnames or []]
    if "name" not in columns or "category" not in columns:
        raise CaptioningError(f"tag list {path} has the columns {columns or 'none'}: a tagger's selected_tags.csv "
                              "has tag_id,name,category,count")
    reader.fieldnames = columns
    rows: list[tuple[str, str]] = []
    unknown: dict[str, int] = {}
    for line, row in enumerate(reader, start=2):
        name = (row.get("name") or "").strip()
        if not name:
            raise CaptioningError(f"{path} line {line}: empty tag name")
        rows.append((name, _category(row.get("category") or "", path, line, unknown)))
    if not rows:
        raise CaptioningError(f"tag list {path} has no tags")
    if unknown:
        logger.warning("%s: unknown category code(s) %s read as general tags", path.name,
                       ", ".join(f"{code} ({n} tags)" for code, n in sorted(unknown.items())))
    return rows


def build_tags(rows: list[tuple[str, str]], rules: NameRules = NameRules()) -> list[Tag]:
    """One :class:`Tag` per row, its written names from ``rules``."""
    tags = [Tag(i, name, rules.names_for(name, category), category) for i, (name, category) in enumerate(rows)]
    unused = set(rules.replacements) - {rules.base_name(name) for name, _ in rows}
    if unused:
        logger.warning("--tag_replacement: no tag named %s in the tag list", ", ".join(repr(u) for u in sorted(unused)))
    return tags
