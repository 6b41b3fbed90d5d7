"""The user-facing error of the captioning scripts."""

from __future__ import annotations


class CaptioningError(ValueError):
    """A problem the user can fix (missing model, bad flag, missing extra); the message is one line
    that names the thing and says what to do. The scripts print it as ``error: <message>``."""
