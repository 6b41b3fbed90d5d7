"""The one exception type of the data pipeline.

Every problem with the user's data (a bad TOML key, a missing folder, a corrupt image, a caption
that is not UTF-8 ...) raises :class:`DatasetError` with a message that says what is wrong, where
(file, folder or TOML key path) and how to fix it. Callers show ``str(error)`` as is.
"""

from __future__ import annotations


class DatasetError(ValueError):
    """Bad dataset input; the message is meant for the user, one line where possible."""
