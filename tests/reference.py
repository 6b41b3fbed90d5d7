"""The reference facts in ../shared/reference (LoRA key lists, checkpoint keys, example metadata)."""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

REFERENCE_DIR = Path(os.environ.get("SD_TRAINER_REFERENCE_DIR",
                                    Path(__file__).resolve().parents[2] / "shared" / "reference"))


@lru_cache(maxsize=None)
def load_reference(name: str) -> dict:
    """``load_reference("lora_keys.json")`` -> its parsed JSON (cached for the session)."""
    path = REFERENCE_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the tests expect ../shared/reference beside the repository "
                                "(or set SD_TRAINER_REFERENCE_DIR)")
    return json.loads(path.read_text(encoding="utf-8"))
