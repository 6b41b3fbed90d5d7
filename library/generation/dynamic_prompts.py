"""Dynamic prompts: ``{a|b|c}`` groups expanded into concrete prompts before weight parsing.

A group is ``{`` options separated by ``|`` ``}``; options may hold nested groups. Forms, by the
header before the options (``n``, ``m``: decimal integers; spaces around the header are allowed):

* ``{a|b|c}``: one option chosen at random;
* ``{e$$a|b|c}``: every option; the prompt becomes several prompts, one per option;
* ``{n$$a|b|c}``: ``n`` distinct options chosen at random (random order), joined by ``", "``;
  ``n`` larger than the number of options means all of them; ``n = 0`` gives empty text;
* ``{n-m$$a|b|c}``: a random count from ``n`` to ``m`` inclusive, then as above; an empty ``n``
  means 1, an empty ``m`` means the number of options; ``n > m`` is read as ``m-n``;
* ``{n$$sep$$a|b|c}``, ``{n-m$$sep$$a|b|c}``: as above, joined by ``sep`` instead of ``", "``;
  ``{$$sep$$a|b|c}`` is the same with a count of 1 (so ``sep`` never shows).

Expansion (:func:`expand_dynamic_prompt`): the groups are resolved left to right with the given
``random.Random`` (an option's nested groups right after the option is chosen), so a seed fixes
the result. Each random group is resolved once per call: when ``e$$`` groups make several prompts,
they share the random choices. Several ``e$$`` groups give the cartesian product in order (the
leftmost group varies slowest). Options keep their whitespace (``{a | b}`` gives ``"a "`` or
``" b"``).

Escapes: ``\\{``, ``\\}``, ``\\|`` are the literal characters (the backslash is removed). Any other
backslash pair (``\\\\``, ``\\(`` ...) is passed through unchanged for the weight parser
(:mod:`library.prompt_weights`), and its second character never opens, closes or splits a group.
``{{`` is not an escape: it is a group nested in a group.

Malformed input never raises; it degrades to literal text:

* a ``{`` with no matching ``}`` and a ``}`` with no ``{`` are literal characters;
* ``|`` outside any group is literal;
* a group whose text before its first ``|`` contains ``$$`` but is not one of the headers above
  (``{x$$a|b}``, ``{$$sep}`` with no second ``$$``) is kept as literal text, braces included
  (groups nested inside it are still expanded);
* groups nested beyond Python's recursion limit leave the whole prompt as literal text.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass

DEFAULT_JOINER = ", "
_ESCAPED = "{}|"
_HEADER = re.compile(r"\s*(?:(?P<enum>e)|(?P<lo>\d*)\s*(?P<dash>-)\s*(?P<hi>\d*)|(?P<n>\d+))?\s*\$\$")


@dataclass(frozen=True)
class _Group:
    content: str  # raw text between the braces


def _unescaped(text: str, start: int = 0):
    """``(index, char)`` for the characters of ``text`` from ``start`` that are neither a backslash
    escape nor the character it escapes: the positions where braces and separators count."""
    i = start
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        yield i, text[i]
        i += 1


def _matching_brace(text: str, start: int) -> int:
    """Index of the ``}`` closing the ``{`` at ``start``, or -1."""
    depth = 0
    for i, ch in _unescaped(text, start):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
    return -1


def _parse(text: str) -> list[str | _Group]:
    """Literal text (escapes resolved) and top-level groups, in order."""
    parts: list[str | _Group] = []
    buf: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            buf.append(nxt if nxt in _ESCAPED else ch + nxt)
            i += 2
            continue
        if ch == "{" and (end := _matching_brace(text, i)) >= 0:
            if buf:
                parts.append("".join(buf))
                buf = []
            parts.append(_Group(text[i + 1:end]))
            i = end + 1
            continue
        buf.append(ch)
        i += 1
    if buf:
        parts.append("".join(buf))
    return parts


def _split_top(text: str, sep: str) -> list[str]:
    """``text`` split at ``sep`` outside nested braces and escapes (raw pieces, escapes kept)."""
    pieces: list[str] = []
    depth = 0
    start = 0
    for i, ch in _unescaped(text):
        if i < start:  # inside a separator just matched
            continue
        if ch == "{":
            depth += 1
        elif ch == "}" and depth > 0:
            depth -= 1
        elif depth == 0 and text.startswith(sep, i):
            pieces.append(text[start:i])
            start = i + len(sep)
    pieces.append(text[start:])
    return pieces


def _expand(text: str, rng: random.Random) -> list[str]:
    alternatives = [[part] if isinstance(part, str) else _expand_group(part.content, rng) for part in _parse(text)]
    return ["".join(combo) for combo in itertools.product(*alternatives)]


def _expand_group(content: str, rng: random.Random) -> list[str]:
    first_option = _split_top(content, "|")[0]
    header = _HEADER.match(content) if "$$" in first_option else None
    if "$$" in first_option and header is None:
        return ["{" + s + "}" for s in _expand(content, rng)]  # unknown header: literal
    if header is None:
        return _choose(_split_top(content, "|"), 1, 1, DEFAULT_JOINER, rng)

    rest = content[header.end():]
    if header["enum"]:
        return [s for option in _split_top(rest, "|") for s in _expand(option, rng)]

    joiner = DEFAULT_JOINER
    sep_and_body = _split_top(rest, "$$")
    if len(sep_and_body) > 1:
        joiner, rest = sep_and_body[0], "$$".join(sep_and_body[1:])
    elif header["n"] is None and header["dash"] is None:
        return ["{" + s + "}" for s in _expand(content, rng)]  # ``{$$x}``: no closing ``$$``: literal
    options = _split_top(rest, "|")
    if header["n"] is not None:
        lo = hi = int(header["n"])
    elif header["dash"]:
        lo = int(header["lo"]) if header["lo"] else 1
        hi = int(header["hi"]) if header["hi"] else len(options)
    else:
        lo = hi = 1
    return _choose(options, min(lo, hi), max(lo, hi), joiner, rng)


def _choose(options: list[str], lo: int, hi: int, joiner: str, rng: random.Random) -> list[str]:
    count = min(rng.randint(lo, hi) if lo != hi else lo, len(options))
    chosen = rng.sample(options, count)
    expanded = [_expand(option, rng) for option in chosen]
    return [joiner.join(combo) for combo in itertools.product(*expanded)]


def expand_dynamic_prompt(prompt: str, rng: random.Random) -> list[str]:
    """The concrete prompt(s) of ``prompt``: one, or several when ``{e$$...}`` groups enumerate.

    ``expand_dynamic_prompt("a {red|blue} {e$$cat|dog}", random.Random(0))`` gives e.g.
    ``["a blue cat", "a blue dog"]``; the rules are in the module docstring. Never raises on any
    string: groups nested so deeply that Python's recursion limit is hit (hundreds of levels) make
    the whole prompt literal text, ``[prompt]``. The number of prompts returned is the product of
    the ``e$$`` groups' option counts; it is not capped.
    """
    try:
        return _expand(prompt, rng)
    except RecursionError:
        return [prompt]
