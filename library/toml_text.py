"""TOML text -> dict with one failure type, for the parsers of user files.

The ``toml`` package (not ``tomllib``: that needs Python 3.11, and the README promises 3.10) raises
``TomlDecodeError`` for most malformed files, but a few inputs crash it inside its decoder instead
(``a = [ "x", false,]`` raises ``IndexError``, found by ``tests/test_fuzz_parsers.py``). Callers
catch ``toml.TomlDecodeError`` and turn it into their own one-line error naming the file; this
wrapper makes that the only exception they can see.
"""

from __future__ import annotations

import toml

TomlDecodeError = toml.TomlDecodeError


def loads(text: str) -> dict:
    """``toml.loads(text)``; any error of the decoder is raised as :class:`toml.TomlDecodeError`."""
    try:
        return toml.loads(text)
    except toml.TomlDecodeError:
        raise
    except (IndexError, KeyError, TypeError, ValueError, AttributeError, RecursionError) as e:
        raise toml.TomlDecodeError(f"malformed TOML ({type(e).__name__}: {e})", text, 0) from None
