"""Merging LoRA files: into a checkpoint, into one LoRA (rank concatenation or same-rank), or by SVD.

The logic behind ``networks/merge_lora.py`` (SD 1.x/2.x), ``networks/sdxl_merge_lora.py`` and
``networks/svd_merge_lora.py``; the scripts only parse flags and call :func:`run_merge` /
:func:`run_svd_merge`. User documentation: ``docs/lora_tools.md``.

Every file ``i`` enters with a weight per module, ``w_i = ratio_i * lbw_i(block of the module)``
(``lbw`` = 1 without ``--lbws``), and contributes ``w_i * ΔW_i`` with ``ΔW_i = alpha_i / rank_i *
up_i @ down_i`` (:meth:`LoRAWeights.delta <networks.lora_file.LoRAWeights.delta>`):

* into a checkpoint: the network built from the file (``networks.lora.create_network_from_weights``,
  on shape-only models made from the checkpoint's header) names the adapted layers, the family's
  own single-file converter, traced (``library.model_tools.converter_trace``), says where each layer
  is stored, and the checkpoint is streamed tensor by tensor with ``w_i * ΔW_i`` added where it
  belongs, so it is never held in memory (a Diffusers folder is loaded and ``merge_to``'d instead);
* ``--concat``: the ranks of all files are stacked, each file's factor folded into its rows, so the
  result's ΔW is exactly ``Σ w_i ΔW_i`` (rank ``Σ rank_i``);
* same rank (no ``--concat``): ``up = Σ s_i up_i``, ``down = Σ sign(f_i) s_i down_i`` with
  ``f_i = w_i * scale_i / scale``, ``s_i = sqrt(|f_i|)``: exact for a module only one file has,
  approximate otherwise (cross terms ``up_i @ down_j``);
* SVD: ``Σ w_i ΔW_i`` truncated to the new rank (:func:`networks.lora_file.low_rank`), alpha = rank.

LoRA Block Weight vectors (``--lbws``) follow the layouts of the sd-webui-lora-block-weight
extension, see :data:`LBW_LAYOUTS`.
"""

from __future__ import annotations

import json
import logging
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from networks.lora_blocks import sd_unet_block_index
from networks.lora_diagnostics import guess_lora_kind
from networks.lora_file import LoRAFileError, LoRAWeights, low_rank, lora_modules, modules_to_state_dict, read_lora, write_lora

logger = logging.getLogger(__name__)

__all__ = [
    "PRECISIONS", "LBWLayout", "LBW_LAYOUTS", "LoRAInput", "dtype_of", "resolve_ratios", "parse_lbw",
    "lbw_layout", "lbw_block", "lora_family", "load_inputs", "concat_merge", "same_rank_merge", "svd_merge",
    "merged_metadata", "merge_into_checkpoint", "check_outputs", "run_merge", "run_svd_merge",
]

PRECISIONS = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

FAMILY_NAMES = {"sd": "SD 1.x/2.x", "sdxl": "SDXL"}
MERGE_SCRIPTS = {"sd": "merge_lora.py", "sdxl": "sdxl_merge_lora.py"}


def dtype_of(name: str) -> torch.dtype:
    try:
        return PRECISIONS[name]
    except KeyError:
        raise LoRAFileError(f"unknown precision {name!r}; use one of {', '.join(PRECISIONS)}") from None


# --- ratios and LoRA Block Weight vectors -----------------------------------------------------

def resolve_ratios(models: Sequence[str], ratios: Sequence[float] | None) -> list[float]:
    """One ratio per model: the given ones (as many as models), or 1.0 each when none are given."""
    if not ratios:
        return [1.0] * len(models)
    if len(ratios) != len(models):
        raise LoRAFileError(f"--ratios has {len(ratios)} values but --models names {len(models)} files; "
                            f"give one ratio per model (or none for 1.0 each)")
    return [float(r) for r in ratios]


@dataclass(frozen=True)
class LBWLayout:
    """A LoRA Block Weight vector layout: which block each value weights.

    ``BASE`` is every text-encoder module, ``INnn``/``OUTnn`` the U-Net's ``input_blocks.nn`` /
    ``output_blocks.nn`` (LDM/SGM numbering), ``M00`` the whole ``middle_block``. Blocks the layout
    does not list keep weight 1.
    """

    length: int
    family: str
    description: str
    blocks: tuple[str, ...]

    def weight(self, vector: Sequence[float], block: str | None) -> float:
        if block is None or block not in self.blocks:
            return 1.0
        return float(vector[self.blocks.index(block)])


def _ins(indices: Iterable[int]) -> tuple[str, ...]:
    return tuple(f"IN{i:02d}" for i in indices)


def _outs(indices: Iterable[int]) -> tuple[str, ...]:
    return tuple(f"OUT{i:02d}" for i in indices)


#: The four vector lengths (sd-webui-lora-block-weight's layouts). The short ones list the blocks
#: that hold attention (Transformer) layers, i.e. every block a LoRA without conv modules has
#: modules in; the long ones list every block of the U-Net.
LBW_LAYOUTS: dict[int, LBWLayout] = {
    layout.length: layout for layout in (
        LBWLayout(17, "sd", "SD 1.x/2.x, attention blocks: BASE, IN01 IN02 IN04 IN05 IN07 IN08, M00, OUT03-OUT11",
                  ("BASE",) + _ins((1, 2, 4, 5, 7, 8)) + ("M00",) + _outs(range(3, 12))),
        LBWLayout(26, "sd", "SD 1.x/2.x, every block: BASE, IN00-IN11, M00, OUT00-OUT11",
                  ("BASE",) + _ins(range(12)) + ("M00",) + _outs(range(12))),
        LBWLayout(12, "sdxl", "SDXL, attention blocks: BASE, IN04 IN05 IN07 IN08, M00, OUT00-OUT05",
                  ("BASE",) + _ins((4, 5, 7, 8)) + ("M00",) + _outs(range(6))),
        LBWLayout(20, "sdxl", "SDXL, every block: BASE, IN00-IN08, M00, OUT00-OUT08",
                  ("BASE",) + _ins(range(9)) + ("M00",) + _outs(range(9))),
    )
}


def parse_lbw(text: str) -> list[float]:
    """``"[1,0,0.5,...]"`` (JSON list) or ``"1,0,0.5,..."`` -> floats."""
    body = text.strip()
    if body.startswith("[") and body.endswith("]"):
        body = body[1:-1]
    try:
        values = [float(v) for v in body.split(",") if v.strip()]
    except ValueError:
        raise LoRAFileError(f"--lbws {text!r}: expected numbers separated by commas, e.g. \"[1,0,0,1,1,1,1,1,1,1,1,1]\"") from None
    if not values:
        raise LoRAFileError(f"--lbws {text!r}: no values")
    return values


def lbw_layout(vector: Sequence[float], family: str, source: str) -> LBWLayout:
    """The layout of a vector for a ``family`` LoRA; a clear error for other lengths."""
    own = {n: layout for n, layout in LBW_LAYOUTS.items() if layout.family == family}
    layout = own.get(len(vector))
    if layout is not None:
        return layout
    choices = "; ".join(f"{n} values = {own[n].description}" for n in sorted(own))
    other = LBW_LAYOUTS.get(len(vector))
    why = f" ({other.length} values is the {FAMILY_NAMES[other.family]} layout)" if other else ""
    raise LoRAFileError(f"--lbws for {source} has {len(vector)} values{why}; an {FAMILY_NAMES[family]} LoRA takes "
                        f"{choices}")


_SGM = re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks)_(\d+)_")


def lbw_block(lora_name: str) -> str | None:
    """The LBW block of a module name: ``BASE`` (text encoders), ``INnn``, ``M00``, ``OUTnn`` or ``None``.

    SGM names (SDXL: ``lora_unet_input_blocks_4_1_...``) carry the block; diffusers names (SD
    1.x/2.x, diffusers-named SDXL files) are numbered by the LDM layout with two layers per level,
    as both SD and SDXL have (:func:`networks.lora_blocks.sd_unet_block_index`).
    """
    if lora_name.startswith("lora_te"):
        return "BASE"
    match = _SGM.match(lora_name)
    if match:
        kind, index = match.group(1), int(match.group(2))
        return {"input_blocks": f"IN{index:02d}", "middle_block": "M00", "output_blocks": f"OUT{index:02d}"}[kind]
    if lora_name.startswith("lora_unet_"):
        block = sd_unet_block_index(lora_name, 2)
        if block is None:
            return None
        if block < 12:
            return f"IN{block:02d}"
        return "M00" if block == 12 else f"OUT{block - 13:02d}"
    return None


# --- input files -------------------------------------------------------------------------------

def lora_family(state_dict: Mapping[str, torch.Tensor], source: str) -> tuple[str, str]:
    """``("sd" | "sdxl", what the file looks like)``; :class:`LoRAFileError` for anything else."""
    kind = guess_lora_kind(state_dict)
    if "SDXL" in kind:
        return "sdxl", kind
    if kind.endswith(" LoRA") and " SD" in kind:
        return "sd", kind
    raise LoRAFileError(f"{source}: not an SD 1.x/2.x or SDXL LoRA: the file looks like {kind}")


def _unet_naming(names: Iterable[str]) -> str | None:
    unet = [n for n in names if n.startswith("lora_unet_")]
    if not unet:
        return None
    return "sgm" if any(_SGM.match(n) for n in unet) else "diffusers"


@dataclass
class LoRAInput:
    """One ``--models`` file with its ratio and LBW vector, read and checked."""

    path: Path
    ratio: float
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, str]
    family: str
    kind: str
    lbw: list[float] | None = None
    layout: LBWLayout | None = None
    modules: dict[str, LoRAWeights] = field(default_factory=dict)

    def weight(self, name: str) -> float:
        """``ratio * (LBW weight of the module's block)``."""
        if self.lbw is None:
            return self.ratio
        return self.ratio * self.layout.weight(self.lbw, lbw_block(name))

    def weighted_state_dict(self) -> dict[str, torch.Tensor]:
        """The file's tensors with each module's ``lora_up`` scaled by its LBW weight (weight-0 modules
        dropped); the ratio is left to the network's multiplier."""
        if self.lbw is None:
            return self.state_dict
        out = {}
        for key, value in self.state_dict.items():
            name, _, suffix = key.partition(".")
            w = self.layout.weight(self.lbw, lbw_block(name))
            if w == 0:
                continue
            out[key] = value * w if suffix == "lora_up.weight" and w != 1 else value
        return out


def load_inputs(models: Sequence[str], ratios: Sequence[float] | None, lbws: Sequence[str] | None,
                family: str | None, *, need_modules: bool = True) -> list[LoRAInput]:
    """Read every file; check they are kohya LoRAs of ``family`` (``None``: all the same family).

    The error for a file of the other family names the script that merges it.
    """
    ratio_list = resolve_ratios(models, ratios)
    if lbws and len(lbws) != len(models):
        raise LoRAFileError(f"--lbws has {len(lbws)} vectors but --models names {len(models)} files; give one per model")
    inputs: list[LoRAInput] = []
    for index, (path, ratio) in enumerate(zip(models, ratio_list)):
        state_dict, metadata = read_lora(path)
        if not state_dict:
            raise LoRAFileError(f"{path}: the file holds no tensors")
        file_family, kind = lora_family(state_dict, str(path))
        expected = family or (inputs[0].family if inputs else file_family)
        if file_family != expected:
            if family is not None:
                raise LoRAFileError(f"{path}: this is {kind}, not an {FAMILY_NAMES[family]} LoRA; merge it with "
                                    f"{MERGE_SCRIPTS[file_family]}")
            raise LoRAFileError(f"{path} is {kind} but {inputs[0].path} is {inputs[0].kind}; LoRAs for different base "
                                f"models cannot be merged")
        item = LoRAInput(Path(path), ratio, state_dict, metadata, file_family, kind)
        if lbws:
            item.lbw = parse_lbw(lbws[index])
            item.layout = lbw_layout(item.lbw, file_family, str(path))
        if need_modules:
            item.modules = lora_modules(state_dict, str(path))
        inputs.append(item)
    if need_modules:
        namings = {(item.path, _unet_naming(item.modules)) for item in inputs}
        spellings = {naming for _, naming in namings if naming}
        if len(spellings) > 1:
            diffusers = next(str(p) for p, naming in namings if naming == "diffusers")
            raise LoRAFileError(f"{diffusers} names its U-Net modules with diffusers paths (lora_unet_down_blocks_...) "
                                f"while other files use SGM paths (lora_unet_input_blocks_...), so the same layer has two "
                                f"names; merge it into the checkpoint with sdxl_merge_lora.py --sd_model, or re-save it "
                                f"with SGM names first")
    return inputs


# --- merging into one LoRA ----------------------------------------------------------------------

def _contributions(inputs: Sequence[LoRAInput]) -> dict[str, list[tuple[LoRAInput, LoRAWeights, float]]]:
    """``{module name: [(file, module, weight), ...]}`` in first-seen order, weight-0 entries left out."""
    table: dict[str, list[tuple[LoRAInput, LoRAWeights, float]]] = {}
    for item in inputs:
        for name, module in item.modules.items():
            table.setdefault(name, [])
            w = item.weight(name)
            if w != 0:
                table[name].append((item, module, w))
    return {name: parts for name, parts in table.items() if parts}


def _check_shapes(name: str, parts: Sequence[tuple[LoRAInput, LoRAWeights, float]]) -> None:
    first_item, first, _ = parts[0]
    for item, module, _ in parts[1:]:
        if (module.down.shape[1:] != first.down.shape[1:] or module.up.shape[0] != first.up.shape[0]
                or module.up.shape[2:] != first.up.shape[2:]):
            raise LoRAFileError(
                f"{item.path}: module {name} adapts a layer of shape {_layer_shape(module)} but {first_item.path} has "
                f"it as {_layer_shape(first)}; the LoRAs are for different base models (e.g. SD 1.x and 2.x)")


def _layer_shape(module: LoRAWeights) -> tuple[int, ...]:
    return (int(module.up.shape[0]),) + tuple(int(s) for s in module.down.shape[1:])


def _signed_roots(factor: float) -> tuple[float, float]:
    """``(down multiplier, up multiplier)`` whose product is ``factor``: ``±sqrt|f|`` and ``sqrt|f|``."""
    root = math.sqrt(abs(factor))
    return (root if factor >= 0 else -root), root


def _bar(items, desc: str):
    return tqdm(items, desc=desc, unit="module", disable=None, leave=False)


def concat_merge(inputs: Sequence[LoRAInput], dtype: torch.dtype = torch.float32, *, shuffle: bool = False,
                 generator: torch.Generator | None = None) -> dict[str, LoRAWeights]:
    """Stack the ranks of every file's module: ``ΔW = Σ w_i ΔW_i`` exactly, rank ``Σ rank_i``.

    alpha = ``Σ |alpha_i|`` (so files with the same alpha/rank keep that scale and their factors
    change only by ``sqrt|w_i|``); file ``i``'s rows carry ``f_i = w_i * scale_i / scale``, split
    as ``±sqrt|f_i|`` on down and ``sqrt|f_i|`` on up. ``shuffle`` permutes the rank order (rows of
    down and columns of up alike, so ΔW is unchanged).
    """
    out: dict[str, LoRAWeights] = {}
    for name, parts in _bar(_contributions(inputs).items(), "concat"):
        _check_shapes(name, parts)
        rank = sum(module.rank for _, module, _ in parts)
        alpha = sum(abs(module.alpha) for _, module, _ in parts) or float(rank)
        scale = alpha / rank
        downs, ups = [], []
        for _, module, w in parts:
            down_mul, up_mul = _signed_roots(w * module.scale / scale)
            downs.append(module.down.to(dtype) * down_mul)
            ups.append(module.up.to(dtype) * up_mul)
        down, up = torch.cat(downs, dim=0), torch.cat(ups, dim=1)
        if shuffle:
            order = torch.randperm(rank, generator=generator)
            down, up = down[order], up[:, order]
        out[name] = LoRAWeights(name, down.contiguous(), up.contiguous(), alpha)
    return out


def same_rank_merge(inputs: Sequence[LoRAInput], dtype: torch.dtype = torch.float32) -> dict[str, LoRAWeights]:
    """Add the factors of same-rank modules: ``up = Σ s_i up_i``, ``down = Σ ±s_i down_i``.

    ``s_i = sqrt|f_i|``, ``f_i = w_i * scale_i / scale`` with the first file's alpha (and so its
    scale) kept. Exact for a module one file has; for a module several files have, ΔW also gets
    the cross terms ``up_i @ down_j`` — an approximation, logged as a warning. Modules of
    different ranks are an error (use ``--concat`` or ``svd_merge_lora.py``).
    """
    out: dict[str, LoRAWeights] = {}
    shared = 0
    for name, parts in _bar(_contributions(inputs).items(), "merge"):
        _check_shapes(name, parts)
        first_item, first, _ = parts[0]
        for item, module, _ in parts[1:]:
            if module.rank != first.rank:
                raise LoRAFileError(f"{item.path}: module {name} has rank {module.rank} but {first_item.path} has rank "
                                    f"{first.rank}; merging without --concat needs equal ranks: use --concat (ranks "
                                    f"add up) or svd_merge_lora.py (any new rank)")
        shared += len(parts) > 1
        scale = first.scale
        down = torch.zeros(first.down.shape, dtype=dtype)
        up = torch.zeros(first.up.shape, dtype=dtype)
        for _, module, w in parts:
            down_mul, up_mul = _signed_roots(w * module.scale / scale)
            down += module.down.to(dtype) * down_mul
            up += module.up.to(dtype) * up_mul
        out[name] = LoRAWeights(name, down, up, first.alpha)
    if shared:
        logger.warning("the same-rank merge is approximate: %d module(s) are in several files, and (Σ up)(Σ down) adds "
                       "cross terms up_i·down_j to their sum; --concat or svd_merge_lora.py give the exact sum", shared)
    return out


def svd_merge(inputs: Sequence[LoRAInput], new_rank: int, new_conv_rank: int | None = None, *,
              device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, LoRAWeights]:
    """``Σ w_i ΔW_i`` per module, truncated by SVD to ``new_rank`` (3x3 convs: ``new_conv_rank``), alpha = rank.

    The rank is capped by the layer's size; with a rank at least that of the stacked inputs the
    result is the exact sum.
    """
    conv_rank = new_conv_rank or new_rank
    out: dict[str, LoRAWeights] = {}
    for name, parts in _bar(_contributions(inputs).items(), "svd"):
        _check_shapes(name, parts)
        delta = None
        for _, module, w in parts:
            term = module.delta(dtype, device) * w
            delta = term if delta is None else delta + term
        rank = conv_rank if parts[0][1].is_spatial_conv else new_rank
        up, down, _ = low_rank(delta, rank)
        out[name] = LoRAWeights(name, down.cpu(), up.cpu(), float(down.shape[0]))
    return out


# --- metadata ----------------------------------------------------------------------------------

#: what ``--no_metadata`` keeps (as the trainers do), besides ``modelspec.*``
MINIMAL_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                "ss_network_args")


def _one_or_dynamic(values: Iterable[float], fmt) -> str | None:
    distinct = set(values)
    if not distinct:
        return None
    return fmt(distinct.pop()) if len(distinct) == 1 else "Dynamic"


def merged_metadata(first: Mapping[str, str], modules: Mapping[str, LoRAWeights], *, family: str, v2: bool = False,
                    no_metadata: bool = False, merged_from: Sequence[Path] = (),
                    ranks: tuple[int, int | None] | None = None) -> dict[str, str]:
    """Metadata of a merged LoRA: the first file's ``ss_*``/``modelspec.*`` keys, ranks and alphas of the result.

    ``ss_network_dim``/``ss_network_alpha`` describe the Linear and 1x1-conv modules (one value, or
    ``"Dynamic"`` when they differ per module); the 3x3-conv modules' go into ``ss_network_args``
    as ``conv_dim``/``conv_alpha``. ``ranks = (rank, conv_rank)`` states them instead (the SVD
    merge's target ranks, alpha = rank). ``sshs_*`` hashes are recomputed on writing.
    """
    md = {k: v for k, v in first.items() if k.startswith(("ss_", "modelspec."))}
    plain = [m for m in modules.values() if not m.is_spatial_conv]
    conv = [m for m in modules.values() if m.is_spatial_conv]
    md["ss_network_module"] = "networks.lora"
    md["ss_network_dim"] = _one_or_dynamic((m.rank for m in plain), str) or md.get("ss_network_dim", "None")
    md["ss_network_alpha"] = _one_or_dynamic((m.alpha for m in plain), lambda a: str(float(a))) or md.get(
        "ss_network_alpha", "None")
    try:
        network_args = json.loads(md.get("ss_network_args", "{}"))
    except json.JSONDecodeError:
        network_args = {}
    if not isinstance(network_args, dict):
        network_args = {}
    network_args.pop("conv_dim", None)
    network_args.pop("conv_alpha", None)
    if conv:
        network_args["conv_dim"] = _one_or_dynamic((m.rank for m in conv), str)
        network_args["conv_alpha"] = _one_or_dynamic((m.alpha for m in conv), lambda a: str(float(a)))
    if ranks is not None:
        rank, conv_rank = ranks[0], ranks[1] or ranks[0]
        md["ss_network_dim"], md["ss_network_alpha"] = str(rank), str(float(rank))
        if conv:
            network_args["conv_dim"], network_args["conv_alpha"] = str(conv_rank), str(float(conv_rank))
    if network_args or "ss_network_args" in md:
        md["ss_network_args"] = json.dumps(network_args)
    if family == "sdxl":
        md.setdefault("ss_v2", "False")
        md.setdefault("ss_base_model_version", "sdxl_base_v1-0")
    else:
        md.setdefault("ss_v2", str(bool(v2)))
        md.setdefault("ss_base_model_version", "sd_v2" if v2 else "sd_v1")
    md.pop("modelspec.hash_sha256", None)
    if no_metadata:
        return {k: v for k, v in md.items() if k in MINIMAL_KEYS or k.startswith("modelspec.")}
    if merged_from and any(k.startswith("modelspec.") for k in md):
        md["modelspec.merged_from"] = ", ".join(p.name for p in merged_from)
    return md


# --- merging into a checkpoint ------------------------------------------------------------------

def _load_for_merge(checkpoint: Path, *, family: str, v2: bool, dtype: torch.dtype, device="cpu",
                    state_dict: dict[str, torch.Tensor] | None = None):
    """``(models, text_encoder argument of the network)`` through the family loader."""
    from library.families.sd.checkpoint import CheckpointError

    try:
        if family == "sdxl":
            from library.families.sdxl.loading import load_sdxl_models

            models = load_sdxl_models(checkpoint, dtype=dtype, device=device, state_dict=state_dict)
            return models, models.text_encoders
        from library.families.sd.loading import load_sd_models

        models = load_sd_models(checkpoint, v2=v2, dtype=dtype, device=device, state_dict=state_dict)
        return models, models.text_encoder
    except CheckpointError as e:
        raise LoRAFileError(f"--sd_model {e}") from None  # names the merge script (script_hints.running_tool)


def _network_for(item: LoRAInput, models, text_encoder):
    """The file's network on ``models`` (the training loader's names and checks); ``(network, weights_sd)``."""
    from networks.lora import create_network_from_weights

    try:
        with warnings.catch_warnings():
            # shape-only (meta) models: the network is built for its names, its weights are not needed
            warnings.filterwarnings("ignore", message=".*to a meta parameter.*")
            return create_network_from_weights(item.ratio, str(item.path), models.vae, text_encoder, models.unet,
                                               weights_sd=item.weighted_state_dict(), for_inference=True)
    except ValueError as e:
        message = str(e)
        raise LoRAFileError(message if message.startswith(str(item.path)) else f"{item.path}: {message}") from None


@dataclass
class _Contribution:
    """``ratio * ΔW`` rows ``[src, src + n)`` of one module go to rows ``[dst, dst + n)`` of a file tensor."""

    file_index: int
    module: LoRAWeights
    ratio: float
    dst: int
    src: int
    length: int


def _plan_contributions(inputs: Sequence[LoRAInput], checkpoint: Path, source, *, family: str, v2: bool
                        ) -> dict[str, list[_Contribution]]:
    """``{file key: contributions}``: which LoRA module changes which rows of which checkpoint tensor.

    The models are built on the ``meta`` device from the file's header (no weights read); each
    file's network is created on them with the training loader's names and checks, and each
    adapted layer is located in the file by tracing the family's own single-file converter
    (:func:`library.model_tools.converter_trace.trace_single_file_layout`).
    """
    from library.model_tools.converter_trace import trace_single_file_layout

    skeleton, text_encoder = _load_for_merge(checkpoint, family=family, v2=v2, dtype=torch.float32, device="meta",
                                             state_dict=source.meta_state_dict())
    stored = {info.name: info.shape for info in source.infos()}
    layout = trace_single_file_layout(skeleton, stored)
    owners: dict[int, tuple[str, str]] = {}
    for part in ("unet", "vae", "text_encoder", "text_encoder1", "text_encoder2"):
        module = getattr(skeleton, part, None)
        if isinstance(module, torch.nn.Module):
            for path, layer in module.named_modules():
                owners.setdefault(id(layer), (part, path))
    plan: dict[str, list[_Contribution]] = {}
    for index, item in enumerate(inputs):
        network, weights_sd = _network_for(item, skeleton, text_encoder)
        modules = lora_modules(weights_sd, str(item.path))
        for lora in network.loras:
            part, path = owners[id(lora.org_module)]
            param = f"{path}.weight"
            segments = layout.get((part, param))
            if not segments or any(seg.key not in stored for seg in segments):
                raise LoRAFileError(f"{item.path}: module {lora.lora_name} adapts {param} of the {part}, which "
                                    f"{checkpoint.name} does not store as a plain tensor; it cannot be merged into "
                                    f"this file")
            for seg in segments:
                plan.setdefault(seg.key, []).append(_Contribution(index, modules[lora.lora_name], item.ratio,
                                                                  seg.dst_start, seg.src_start, seg.length))
        logger.info("%s: ratio %g, %d modules", item.path, item.ratio, len(network.loras))
        del network, weights_sd
    return plan


def _merged_tensor(tensor: torch.Tensor, contributions: Sequence[_Contribution], dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` in ``dtype`` with each contribution added (in float32, rounded back to ``dtype`` after
    each module, as merging into ``dtype`` models does), files in their given order."""
    weight = tensor.to(dtype, copy=True)
    for c in sorted(contributions, key=lambda c: c.file_index):
        delta = (c.module.delta(torch.float32) * c.ratio)[c.src: c.src + c.length]
        rows = weight[c.dst: c.dst + c.length]
        rows.copy_((rows.float() + delta.reshape(rows.shape)).to(dtype))
    return weight


def _stream_merge(inputs: Sequence[LoRAInput], checkpoint: Path, save_to: Path, *, family: str, v2: bool,
                  dtype: torch.dtype, save_dtype: torch.dtype, no_metadata: bool) -> None:
    """Read the single file tensor by tensor, add the LoRA rows, write each tensor out: the memory
    used is one tensor and one ΔW at a time (plus the LoRAs), whatever the checkpoint's size."""
    from library.model_tools.tensor_files import SafetensorsWriter, TensorFileError, TensorInfo, open_tensor_file

    try:
        source = open_tensor_file(checkpoint)
    except TensorFileError as e:
        raise LoRAFileError(f"--sd_model {e}") from None
    with source:
        plan = _plan_contributions(inputs, checkpoint, source, family=family, v2=v2)
        infos = source.infos()

        def out_dtype(info: TensorInfo) -> torch.dtype:
            return save_dtype if info.dtype.is_floating_point else info.dtype

        def merged(info: TensorInfo) -> torch.Tensor:
            tensor = source.get(info.name)
            if info.name in plan:
                tensor = _merged_tensor(tensor, plan[info.name], dtype)
            return tensor.to(out_dtype(info))

        bar = tqdm(infos, desc="writing", unit="tensor", disable=None, leave=False)
        if save_to.suffix.lower() == ".safetensors":
            metadata = {} if no_metadata else dict(source.metadata)
            layout = [TensorInfo(info.name, out_dtype(info), info.shape) for info in infos]
            with SafetensorsWriter(save_to, layout, metadata or None) as writer:
                for info in bar:
                    writer.write(info.name, merged(info))
        else:
            from library.io_utils import save_torch

            save_torch({"state_dict": {info.name: merged(info) for info in bar}}, save_to)
    logger.info("saved %s (%d tensors, %d changed, %s)", save_to, len(infos), len(plan),
                str(save_dtype).replace("torch.", ""))


def _merge_into_loaded_models(inputs: Sequence[LoRAInput], checkpoint: Path, save_to: Path, *, family: str, v2: bool,
                              dtype: torch.dtype, save_dtype: torch.dtype) -> None:
    """A Diffusers folder: load the models, ``merge_to`` each network, write the single file tensor by tensor."""
    models, text_encoder = _load_for_merge(checkpoint, family=family, v2=v2, dtype=dtype)
    for item in tqdm(inputs, desc="merging", unit="file", disable=None, leave=False):
        network, weights_sd = _network_for(item, models, text_encoder)
        network.merge_to(text_encoder, models.unet, weights_sd, dtype)
        logger.info("merged %s (ratio %g, %d modules) into %s", item.path, item.ratio, len(network.loras),
                    checkpoint.name)
        del network, weights_sd
    with torch.no_grad():
        state = models.ldm_state_dict()
    items = [(k, v.detach().to(save_dtype) if v.is_floating_point() else v.detach()) for k, v in state.items()]
    if save_to.suffix.lower() == ".safetensors":
        from library.model_tools.tensor_files import write_safetensors

        write_safetensors(save_to, items)
    else:
        from library.io_utils import save_torch

        save_torch({"state_dict": dict(items)}, save_to)
    logger.info("saved %s (%d tensors, %s)", save_to, len(items), str(save_dtype).replace("torch.", ""))


def merge_into_checkpoint(inputs: Sequence[LoRAInput], checkpoint: str | Path, save_to: str | Path, *, family: str,
                          v2: bool = False, dtype: torch.dtype = torch.float32,
                          save_dtype: torch.dtype = torch.float32, no_metadata: bool = False) -> None:
    """Add ``ratio * ΔW`` of each file (LBW-weighted per block) to the checkpoint, write the single file.

    A single file (``.safetensors``/``.ckpt``) is streamed: read one tensor at a time, changed
    where a LoRA module adapts it, written out, so the checkpoint is never held in memory (see
    :func:`_stream_merge`). A Diffusers folder is loaded as models, merged with the network's
    ``merge_to`` and written as a single file. Either way the LoRA names and checkpoint keys are
    matched by the training loaders' own tables. Floating tensors are written in ``save_dtype``
    (tensors no LoRA touches straight from the file); adapted ones are computed in ``dtype``.
    A ``.safetensors`` input's metadata is kept unless ``no_metadata``.
    """
    checkpoint, save_to = Path(checkpoint), Path(save_to)
    if not checkpoint.exists():
        raise FileNotFoundError(f"--sd_model {checkpoint}: no such file or folder")
    if checkpoint.is_dir():
        _merge_into_loaded_models(inputs, checkpoint, save_to, family=family, v2=v2, dtype=dtype,
                                  save_dtype=save_dtype)
        return
    _stream_merge(inputs, checkpoint, save_to, family=family, v2=v2, dtype=dtype, save_dtype=save_dtype,
                  no_metadata=no_metadata)


# --- the scripts' bodies -----------------------------------------------------------------------

def check_outputs(save_to: str | None, inputs: Iterable[str | None]) -> Path:
    """``--save_to`` must be given and must not be one of the input files."""
    if not save_to:
        raise LoRAFileError("--save_to is required: the file to write")
    target = Path(save_to).resolve()
    for source in inputs:
        if source and Path(source).resolve() == target:
            raise LoRAFileError(f"--save_to {save_to} is one of the input files; choose another output path")
    return Path(save_to)


def _write_merged_lora(modules: Mapping[str, LoRAWeights], inputs: Sequence[LoRAInput], save_to: Path, *,
                       family: str, v2: bool, save_dtype: torch.dtype, no_metadata: bool,
                       ranks: tuple[int, int | None] | None = None) -> None:
    if not modules:
        raise LoRAFileError("nothing to write: every module has weight 0 (check --ratios/--lbws)")
    metadata = merged_metadata(inputs[0].metadata, modules, family=family, v2=v2, no_metadata=no_metadata,
                               merged_from=[item.path for item in inputs], ranks=ranks)
    write_lora(save_to, modules_to_state_dict(modules, save_dtype), metadata, inputs=[item.path for item in inputs])
    ranks = sorted({m.rank for m in modules.values()})
    logger.info("saved %s: %d modules, rank %s", save_to, len(modules),
                ranks[0] if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}")


def run_merge(args, family: str) -> None:
    """``merge_lora.py`` / ``sdxl_merge_lora.py``: into ``--sd_model`` if given, else into one LoRA."""
    save_to = check_outputs(args.save_to, [*args.models, args.sd_model])
    if args.shuffle and not args.concat:
        raise LoRAFileError("--shuffle reorders the ranks of a --concat merge; add --concat or drop --shuffle")
    dtype, save_dtype = dtype_of(args.precision), dtype_of(args.save_precision)
    v2 = bool(getattr(args, "v2", False))
    inputs = load_inputs(args.models, args.ratios, getattr(args, "lbws", None), family,
                         need_modules=not args.sd_model)
    if args.sd_model:
        if args.concat or args.shuffle:
            logger.warning("--concat/--shuffle apply to merging LoRAs into one LoRA; ignored with --sd_model")
        merge_into_checkpoint(inputs, args.sd_model, save_to, family=family, v2=v2, dtype=dtype,
                              save_dtype=save_dtype, no_metadata=args.no_metadata)
        return
    if args.concat:
        modules = concat_merge(inputs, dtype, shuffle=args.shuffle)
    else:
        modules = same_rank_merge(inputs, dtype)
    _write_merged_lora(modules, inputs, save_to, family=family, v2=v2, save_dtype=save_dtype,
                       no_metadata=args.no_metadata)


def run_svd_merge(args) -> None:
    """``svd_merge_lora.py``: SD or SDXL from the files' keys, summed and re-ranked by SVD."""
    save_to = check_outputs(args.save_to, args.models)
    if args.new_rank < 1 or (args.new_conv_rank is not None and args.new_conv_rank < 1):
        raise LoRAFileError("--new_rank and --new_conv_rank must be at least 1")
    device = args.device or "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise LoRAFileError(f"--device {device}: CUDA is not available here; use --device cpu")
    dtype, save_dtype = dtype_of(args.precision), dtype_of(args.save_precision)
    inputs = load_inputs(args.models, args.ratios, args.lbws, None)
    family = inputs[0].family
    logger.info("%s LoRAs; new rank %d, conv rank %d", FAMILY_NAMES[family], args.new_rank,
                args.new_conv_rank or args.new_rank)
    modules = svd_merge(inputs, args.new_rank, args.new_conv_rank, device=device, dtype=dtype)
    v2 = inputs[0].metadata.get("ss_v2") == "True"
    _write_merged_lora(modules, inputs, save_to, family=family, v2=v2, save_dtype=save_dtype,
                       no_metadata=args.no_metadata, ranks=(args.new_rank, args.new_conv_rank))
