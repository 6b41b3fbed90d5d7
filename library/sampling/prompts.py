"""Sample-prompt files (``--sample_prompts``): ``.txt``, ``.toml`` and ``.json``.

Contract
--------
:func:`load_prompts` turns a prompt file into a list of :class:`SamplePrompt`, fully resolved:
every field has a value (defaults filled in from :class:`PromptDefaults`), width and height are
floored to ``defaults.size_multiple`` (never below ``defaults.min_size``), steps are within
``1..defaults.max_steps``. ``seed`` stays ``None`` when the file gives none; the caller draws a
random one at sampling time.

``.txt``: one prompt per line; blank lines and lines starting with ``#`` are skipped. Options follow
the prompt as `` --x value`` (the line is split on `` --``): ``--n`` negative prompt, ``--w`` width,
``--h`` height, ``--d`` seed, ``--s`` steps, ``--l`` CFG scale, ``--g`` embedded guidance,
``--ss`` sampler, ``--cn`` ControlNet image, ``--ctr`` / ``--rcfg`` / ``--fs`` (Lumina-style
cfg-truncation ratio, renorm CFG, flow shift; stored, unused by SD). Option letters are
case-insensitive.

``.toml``: ``[prompt]`` holds defaults, each ``[[prompt.subset]]`` one prompt; a subset's value
overrides the ``[prompt]`` value. (The reference implementation raises when a subset repeats a key
of ``[prompt]``; overriding is what users mean, so we do that.)

``.json``: a list of objects. TOML/JSON keys: ``prompt``, ``negative_prompt``, ``width``,
``height``, ``seed``, ``sample_steps``, ``scale``, ``guidance_scale``, ``sample_sampler``,
``controlnet_image``, ``cfg_trunc_ratio``, ``renorm_cfg``, ``flow_shift``.

Every error is a :class:`PromptFileError` naming the file and line (or entry), what is wrong and
what is accepted.

:func:`parse_prompt_line` parses one ``.txt``-style line on its own; ``gen_img.py`` reuses it and can
pass a larger option table (options whose key is not a :class:`SamplePrompt` field land in
``SamplePrompt.extras``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import toml  # not tomllib: that needs Python 3.11, and the README promises 3.10
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, Sequence

from library import toml_text

logger = logging.getLogger(__name__)

__all__ = [
    "PromptDefaults",
    "PromptFileError",
    "PromptOption",
    "SAMPLE_PROMPT_OPTIONS",
    "PROMPT_FILE_KEYS",
    "SamplePrompt",
    "load_prompts",
    "parse_prompt_line",
    "prompt_from_dict",
    "prompts_summary",
]


class PromptFileError(ValueError):
    """A prompt file (or one line of it) cannot be used; the message says where and why."""


@dataclass(frozen=True)
class PromptDefaults:
    """Values for whatever a prompt does not specify, and the size/steps rules of a model family.

    The defaults are SD 1.x/2.x/SDXL's; FLUX would use e.g.
    ``PromptDefaults(steps=20, scale=1.0, guidance_scale=3.5, size_multiple=16)``.
    ``sampler`` is the ``--sample_sampler`` value.
    """

    width: int = 512
    height: int = 512
    steps: int = 30
    scale: float = 7.5
    sampler: str | None = None
    guidance_scale: float | None = None
    negative_prompt: str = ""
    size_multiple: int = 8
    min_size: int = 64
    max_steps: int = 1000


@dataclass(frozen=True)
class SamplePrompt:
    """One image to generate.

    ``index`` is the prompt's position in its file (0-based; it names the output image) and
    ``source`` says where it came from (``prompts.txt:7``) for messages. ``extras`` holds options
    that are not fields here (only with a custom option table, see :func:`parse_prompt_line`).
    """

    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    seed: int | None = None
    steps: int = 30
    scale: float = 7.5
    sampler: str | None = None
    guidance_scale: float | None = None
    controlnet_image: str | None = None
    cfg_trunc_ratio: float | None = None
    renorm_cfg: float | None = None
    flow_shift: float | None = None
    index: int = 0
    source: str = ""
    extras: Mapping[str, Any] = field(default_factory=dict)


# --- value parsers ---------------------------------------------------------------------------
# Each takes a raw value (str from .txt, any JSON/TOML scalar otherwise) and returns the typed
# value or raises ValueError with a short description of what is expected.

def _as_int(value: Any) -> int:
    if isinstance(value, bool):  # bool is an int subclass; `true` is never a size or a seed
        raise ValueError("expected an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ValueError("expected an integer")


def _as_seed(value: Any) -> int:
    seed = _as_int(value)
    if not 0 <= seed < 2**64:
        raise ValueError("expected an integer between 0 and 2**64-1")
    return seed


def as_finite_float(value: Any) -> float:
    """A prompt option's number: finite (nan/inf would make every pixel NaN), bools refused."""
    if isinstance(value, bool):
        raise ValueError("expected a number")
    number = None
    if isinstance(value, (int, float)):
        try:
            number = float(value)
        except OverflowError:  # an integer beyond float range
            pass
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            pass
    if number is None:
        raise ValueError("expected a number")
    if not math.isfinite(number):  # nan/inf (JSON NaN, "--l inf") would make every pixel NaN
        raise ValueError("expected a finite number")
    return number


def _as_text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value.strip()


def _as_name(value: Any) -> str:
    name = _as_text(value).lower()
    if not name:
        raise ValueError("expected a name")
    return name


def _as_path(value: Any) -> str:
    path = _as_text(value)
    if not path:
        raise ValueError("expected a file path")
    return path


@dataclass(frozen=True)
class PromptOption:
    """One `` --flag value`` option of a prompt line: which ``SamplePrompt`` field (or ``extras``
    key) it sets, how its value is parsed, and a short description for error messages."""

    flag: str
    key: str
    parse: Callable[[Any], Any]
    help: str


SAMPLE_PROMPT_OPTIONS: dict[str, PromptOption] = {
    o.flag: o
    for o in (
        PromptOption("n", "negative_prompt", _as_text, "negative prompt"),
        PromptOption("w", "width", _as_int, "width in pixels"),
        PromptOption("h", "height", _as_int, "height in pixels"),
        PromptOption("d", "seed", _as_seed, "seed"),
        PromptOption("s", "steps", _as_int, "sampling steps"),
        PromptOption("l", "scale", as_finite_float, "CFG scale"),
        PromptOption("g", "guidance_scale", as_finite_float, "embedded guidance (FLUX)"),
        PromptOption("ss", "sampler", _as_name, "sampler name"),
        PromptOption("cn", "controlnet_image", _as_path, "ControlNet image path"),
        PromptOption("ctr", "cfg_trunc_ratio", as_finite_float, "CFG truncation ratio (Lumina)"),
        PromptOption("rcfg", "renorm_cfg", as_finite_float, "renorm CFG (Lumina)"),
        PromptOption("fs", "flow_shift", as_finite_float, "flow shift (Lumina)"),
    )
}

# TOML/JSON key -> (SamplePrompt field, parser). The file keys are the reference's names.
PROMPT_FILE_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "prompt": ("prompt", _as_text),
    "negative_prompt": ("negative_prompt", _as_text),
    "width": ("width", _as_int),
    "height": ("height", _as_int),
    "seed": ("seed", _as_seed),
    "sample_steps": ("steps", _as_int),
    "scale": ("scale", as_finite_float),
    "guidance_scale": ("guidance_scale", as_finite_float),
    "sample_sampler": ("sampler", _as_name),
    "controlnet_image": ("controlnet_image", _as_path),
    "cfg_trunc_ratio": ("cfg_trunc_ratio", as_finite_float),
    "renorm_cfg": ("renorm_cfg", as_finite_float),
    "flow_shift": ("flow_shift", as_finite_float),
}

_FIELDS = {f.name for f in dataclasses.fields(SamplePrompt)}


def _resolve(values: dict[str, Any], *, defaults: PromptDefaults, index: int, source: str,
             samplers: Collection[str] | None) -> SamplePrompt:
    """Fill defaults and apply the family's size/steps rules to parsed values."""
    extras = {k: values.pop(k) for k in list(values) if k not in _FIELDS}

    def floor_size(name: str) -> int:
        raw = values.get(name, getattr(defaults, name))
        size = max(defaults.min_size, raw - raw % defaults.size_multiple)
        if size != raw:
            logger.debug("%s: %s %d -> %d (multiple of %d, at least %d)", source, name, raw, size,
                         defaults.size_multiple, defaults.min_size)
        return size

    steps = values.get("steps", defaults.steps)
    if not 1 <= steps <= defaults.max_steps:
        # Clamped, not rejected: files written for the reference (which clamps) keep working.
        clamped = min(max(steps, 1), defaults.max_steps)
        logger.warning("%s: steps %d is outside 1..%d, using %d", source, steps, defaults.max_steps, clamped)
        steps = clamped

    sampler = values.get("sampler", defaults.sampler)
    if sampler is not None and samplers is not None and sampler not in samplers:
        raise PromptFileError(f"{source}: unknown sampler {sampler!r}; valid samplers: {', '.join(samplers)}")

    negative = values.get("negative_prompt", defaults.negative_prompt)
    guidance = values.get("guidance_scale", defaults.guidance_scale)
    return SamplePrompt(
        prompt=values.get("prompt", ""),
        negative_prompt=negative,
        width=floor_size("width"),
        height=floor_size("height"),
        seed=values.get("seed"),
        steps=steps,
        scale=values.get("scale", defaults.scale),
        sampler=sampler,
        guidance_scale=guidance,
        controlnet_image=values.get("controlnet_image"),
        cfg_trunc_ratio=values.get("cfg_trunc_ratio"),
        renorm_cfg=values.get("renorm_cfg"),
        flow_shift=values.get("flow_shift"),
        index=index,
        source=source,
        extras=extras,
    )


def _options_help(options: Mapping[str, PromptOption]) -> str:
    return ", ".join(f"--{o.flag} ({o.help})" for o in options.values())


def parse_prompt_line(
    line: str,
    *,
    defaults: PromptDefaults = PromptDefaults(),
    index: int = 0,
    source: str = "<prompt>",
    options: Mapping[str, PromptOption] = SAMPLE_PROMPT_OPTIONS,
    samplers: Collection[str] | None = None,
) -> SamplePrompt:
    """Parse one ``prompt text --w 768 --d 42 ...`` line into a resolved :class:`SamplePrompt`.

    ``source`` (e.g. ``"prompts.txt:3"``) prefixes every error. ``options`` maps lower-case flag
    letters to :class:`PromptOption`; ``samplers``, when given, is the set of valid ``--ss`` names.
    A later repetition of an option wins. Raises :class:`PromptFileError`.
    """
    text = line.strip()
    if text.startswith("--"):  # options only, empty prompt: make the split below see them
        text = " " + text
    head, *parts = text.split(" --")
    values: dict[str, Any] = {"prompt": head.strip()}
    for part in parts:
        match = re.match(r"(\S*)\s*(.*)\Z", part, re.DOTALL)
        flag, raw = match.group(1).lower(), match.group(2).strip()
        option = options.get(flag)
        if option is None:
            raise PromptFileError(
                f"{source}: unknown option --{flag or '(empty)'}; valid options: {_options_help(options)}. "
                "Options are written ' --x value' after the prompt."
            )
        if raw == "" and option.parse is not _as_text:
            raise PromptFileError(f"{source}: option --{flag} ({option.help}) needs a value, e.g. --{flag} 512")
        try:
            values[option.key] = option.parse(raw)
        except ValueError as e:
            raise PromptFileError(f"{source}: bad value {raw!r} for --{flag} ({option.help}): {e}") from None
    return _resolve(values, defaults=defaults, index=index, source=source, samplers=samplers)


def prompt_from_dict(
    entry: Mapping[str, Any],
    *,
    defaults: PromptDefaults = PromptDefaults(),
    index: int = 0,
    source: str = "<prompt>",
    samplers: Collection[str] | None = None,
) -> SamplePrompt:
    """Build a resolved :class:`SamplePrompt` from a TOML/JSON object (keys in ``PROMPT_FILE_KEYS``).

    ``None`` values mean "not given". Unknown keys and missing ``prompt`` raise
    :class:`PromptFileError`.
    """
    if not isinstance(entry, Mapping):
        raise PromptFileError(f"{source}: expected an object with a 'prompt' key, got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(PROMPT_FILE_KEYS))
    if unknown:
        raise PromptFileError(
            f"{source}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(PROMPT_FILE_KEYS)}"
        )
    if entry.get("prompt") is None:
        raise PromptFileError(f"{source}: missing 'prompt' (the text to generate)")
    values: dict[str, Any] = {}
    for key, value in entry.items():
        if value is None:
            continue
        name, parse = PROMPT_FILE_KEYS[key]
        try:
            values[name] = parse(value)
        except ValueError as e:
            raise PromptFileError(f"{source}: bad value {value!r} for '{key}': {e}") from None
    return _resolve(values, defaults=defaults, index=index, source=source, samplers=samplers)


def _read_text(path: Path) -> str:
    # utf-8-sig: Notepad-written files start with a BOM that would otherwise end up in prompt 0.
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise PromptFileError(f"{path}: not UTF-8 text (invalid byte at offset {e.start}); "
                              "re-save it with UTF-8 encoding") from None


def _load_txt(path: Path, defaults: PromptDefaults, samplers: Collection[str] | None) -> list[SamplePrompt]:
    prompts: list[SamplePrompt] = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        prompts.append(parse_prompt_line(line, defaults=defaults, index=len(prompts),
                                         source=f"{path}:{lineno}", samplers=samplers))
    return prompts


def _load_toml(path: Path, defaults: PromptDefaults, samplers: Collection[str] | None) -> list[SamplePrompt]:
    try:
        data = toml_text.loads(_read_text(path))
    except toml.TomlDecodeError as e:
        raise PromptFileError(f"{path}: invalid TOML: {e}") from None
    table = data.get("prompt")
    if not isinstance(table, dict):
        raise PromptFileError(f"{path}: no [prompt] table; write defaults under [prompt] and each prompt "
                              "as a [[prompt.subset]] entry with a 'prompt' key")
    subsets = table.get("subset")
    if not isinstance(subsets, list) or not subsets:
        raise PromptFileError(f"{path}: no [[prompt.subset]] entries; add one per prompt, e.g.\n"
                              "[[prompt.subset]]\nprompt = \"a cat\"")
    shared = {k: v for k, v in table.items() if k != "subset"}
    unknown = sorted(set(shared) - set(PROMPT_FILE_KEYS))
    if unknown:
        raise PromptFileError(f"{path}: [prompt]: unknown key(s) {', '.join(map(repr, unknown))}; "
                              f"valid keys: {', '.join(PROMPT_FILE_KEYS)}")
    prompts = []
    for i, subset in enumerate(subsets):
        source = f"{path}: [[prompt.subset]] #{i + 1}"
        if not isinstance(subset, dict):
            raise PromptFileError(f"{source}: expected a table")
        prompts.append(prompt_from_dict({**shared, **subset}, defaults=defaults, index=i, source=source,
                                        samplers=samplers))
    return prompts


def _load_json(path: Path, defaults: PromptDefaults, samplers: Collection[str] | None) -> list[SamplePrompt]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise PromptFileError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(data, list):
        raise PromptFileError(f"{path}: expected a JSON list of prompt objects, e.g. [{{\"prompt\": \"a cat\"}}]")
    return [prompt_from_dict(entry, defaults=defaults, index=i, source=f"{path}: entry #{i + 1}", samplers=samplers)
            for i, entry in enumerate(data)]


_LOADERS = {".txt": _load_txt, ".toml": _load_toml, ".json": _load_json}


def load_prompts(
    path: str | Path,
    *,
    defaults: PromptDefaults = PromptDefaults(),
    samplers: Collection[str] | None = None,
) -> list[SamplePrompt]:
    """Read a ``--sample_prompts`` file (``.txt``, ``.toml`` or ``.json``, chosen by suffix).

    Returns resolved prompts with ``index`` 0, 1, ... in file order. ``samplers`` (optional) is the
    collection of valid sampler names, checked now so a typo fails before training starts.
    Raises :class:`PromptFileError` (a ``ValueError``) or ``FileNotFoundError``.
    """
    path = Path(path)
    loader = _LOADERS.get(path.suffix.lower())
    if loader is None:
        raise PromptFileError(f"{path}: unsupported prompt file type {path.suffix!r}; use .txt, .toml or .json")
    if not path.is_file():
        raise FileNotFoundError(f"sample prompt file not found: {path}")
    prompts = loader(path, defaults, samplers)
    if not prompts:
        logger.warning("%s: no prompts found (only blank lines or comments?)", path)
    return prompts


def prompts_summary(prompts: Sequence[SamplePrompt]) -> str:
    """One short line describing a prompt list, for the training log."""
    sizes = sorted({f"{p.width}x{p.height}" for p in prompts})
    return f"{len(prompts)} prompt(s), sizes {', '.join(sizes) or '-'}"
