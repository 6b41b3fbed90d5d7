"""Which script (or flag) to name when a model file belongs to another family than the running tool.

The loaders find out that ``--pretrained_model_name_or_path`` is, say, an SDXL checkpoint while an
SD 1.x tool runs. The fix they print depends on the tool, not on the loader: ``fine_tune.py`` needs
``sdxl_train.py``, ``train_network.py`` needs ``sdxl_train_network.py``, ``merge_lora.py`` needs
``sdxl_merge_lora.py`` and ``extract_lora_from_models.py`` needs its ``--sdxl`` flag. The entry
point of each tool says what it is with :func:`running_tool`; the loaders ask :func:`fix_for`.

    with running_tool("fine_tune"):
        ...  # a loader raising CheckpointError(f"{path} is an SDXL checkpoint: {fix_for('sdxl')}")
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Iterator

#: what each kind of tool needs for a model of each family: a script, or the flag that switches it
FIXES: dict[str, dict[str, str]] = {
    "network": {"sd": "use train_network.py", "sdxl": "use sdxl_train_network.py",
                "flux": "use flux_train_network.py", "sd3": "use sd3_train_network.py"},
    "fine_tune": {"sd": "use fine_tune.py", "sdxl": "use sdxl_train.py"},
    "dreambooth": {"sd": "use train_db.py", "sdxl": "use sdxl_train.py"},
    "textual_inversion": {"sd": "use train_textual_inversion.py", "sdxl": "use sdxl_train_textual_inversion.py"},
    "merge": {"sd": "use merge_lora.py", "sdxl": "use sdxl_merge_lora.py"},
    "extract": {"sd": "remove --sdxl", "sdxl": "add --sdxl"},
}

_TOOL: ContextVar[str] = ContextVar("running_tool", default="network")


@contextlib.contextmanager
def running_tool(kind: str) -> Iterator[None]:
    """Name the kind of tool (a key of :data:`FIXES`) for the loaders' messages inside the block."""
    if kind not in FIXES:
        raise KeyError(f"unknown tool kind {kind!r}; known: {', '.join(FIXES)}")
    token = _TOOL.set(kind)
    try:
        yield
    finally:
        _TOOL.reset(token)


def fix_for(family: str) -> str:
    """``"use <script>"`` (or the flag to change) for a model of ``family`` ("sd", "sdxl", "flux", "sd3").

    A family the running kind of tool has no script for (FLUX.1 with ``fine_tune.py``) gets the
    network-training script, the one tool every family has.
    """
    fixes = FIXES[_TOOL.get()]
    if family in fixes:
        return fixes[family]
    return f"{FIXES['network'][family]} (this kind of tool does not exist for that model family)"
