"""ControlNet-LLLite for SDXL: small conditioning adapters hooked into the U-Net's attention inputs.

An LLLite network steers an SDXL U-Net with a control image (edges, depth, ...) at a fraction
of a ControlNet's size. Each adapted ``nn.Linear`` gets an :class:`LLLiteModule`:

* ``conditioning1``: strided convolutions that embed the control image (``[B, 3, H, W]`` in
  ``[-1, 1]``) down to the token grid of the layer's level: ``H/8`` for the first U-Net level
  (``depth`` 1: conv 4/4 -> ReLU -> conv 2/2), ``H/16`` (depth 2: 4/4 -> 4/4), ``H/32`` (depth 3:
  4/4 -> 4/4 -> 2/2). Its output has ``cond_emb_dim`` channels (``cond_emb_dim/2`` in between).
  It runs once per control image (:meth:`ControlNetLLLite.set_cond_image`), not once per
  denoising step.
* ``down`` (Linear ``in -> mlp_dim`` + ReLU), ``mid`` (Linear ``mlp_dim + cond_emb_dim -> mlp_dim``
  + ReLU on the concatenation ``[embedding, down(x)]``), ``up`` (Linear ``mlp_dim -> in``):

      y = layer(x + up(mid([cond_emb, down(x)])) * multiplier)

  The layer's *input* is nudged, not its output. ``up`` starts at zero (weight and bias), so a
  fresh network leaves the U-Net's output exactly unchanged (the reference zeroes only the
  weight; a zero bias too is the same file format).

Which layers (the reference's target list): the ``attn1`` ``to_q``/``to_k``/``to_v`` and the
``attn2`` ``to_q`` of every transformer block of the input (down) blocks and the middle block;
``attn2``'s key/value read the text, whose token grid the image cannot match, and the output
blocks are left alone. Full-size SDXL: 2 x 2 + 2 x 10 transformer blocks in input blocks 4/5 and
7/8, 10 in the middle block, 4 layers each: 136 modules.

File format (``lllite_unet.*`` networks; what kohya's gen_img and the ComfyUI LLLite node load):
``lllite_unet_<SGM module path with _>.<param>`` with params ``conditioning1.{0,2[,4]}.weight/bias``,
``down.0.*``, ``mid.0.*``, ``up.0.*``, e.g.
``lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.down.0.weight``. ``mlp_dim`` (the
``--network_dim``) is ``down.0.weight``'s first dimension, ``cond_emb_dim`` twice
``conditioning1.0.weight``'s, the depth of a module follows from its ``conditioning1`` keys. The
names come from the same diffusers -> SGM map as SDXL LoRA names (``networks.lora.sdxl_unet_scope``).

Hooking is :class:`networks.lora_modules.LayerAdapter`'s, as for LoRA: the base layer stays in the
model and its state dict is untouched. LLLite cannot be merged into the weights (it depends on the
control image).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from library.io_utils import save_safetensors, save_torch
from networks.lora import is_sdxl_unet, sdxl_unet_scope
from networks.lora_diagnostics import format_key_list
from networks.lora_modules import LayerAdapter
from networks.lora_network import load_weights_file

logger = logging.getLogger(__name__)

__all__ = ["LLLITE_PREFIX", "LLLiteModule", "ControlNetLLLite", "LLLiteError", "create_network",
           "create_network_from_weights", "lllite_dims", "plan_lllite"]

LLLITE_PREFIX = "lllite_unet"
MAX_DEPTH = 3
DEFAULT_COND_EMB_DIM = 16
DEFAULT_MLP_DIM = 16

# diffusers module paths of the reference's targets: attn1 q/k/v and attn2 q of the down/mid blocks
_TARGET_PATH = re.compile(
    r"^(?:down_blocks\.(?P<level>\d+)|mid_block)\.attentions\.\d+\.transformer_blocks\.\d+\."
    r"(?:attn1\.to_[qkv]|attn2\.to_q)$"
)


class LLLiteError(ValueError):
    """An LLLite file or control image that does not fit the model; the message names the file/key."""


def conditioning_embedding(depth: int, cond_emb_dim: int, device: torch.device | None = None) -> nn.Sequential:
    """Control image [B,3,H,W] -> [B, cond_emb_dim, H/s, W/s] with s = 8, 16, 32 for depth 1, 2, 3.

    The layer indices (0, 2, 4 with ReLUs between) are the file's ``conditioning1.<i>`` keys.
    """
    if depth not in (1, 2, 3):
        raise LLLiteError(f"LLLite conditioning depth must be 1, 2 or 3, got {depth}")
    half = cond_emb_dim // 2
    layers: list[nn.Module] = [nn.Conv2d(3, half, 4, stride=4, device=device), nn.ReLU()]
    if depth == 1:
        layers.append(nn.Conv2d(half, cond_emb_dim, 2, stride=2, device=device))
    elif depth == 2:
        layers.append(nn.Conv2d(half, cond_emb_dim, 4, stride=4, device=device))
    else:
        layers += [nn.Conv2d(half, half, 4, stride=4, device=device), nn.ReLU(),
                   nn.Conv2d(half, cond_emb_dim, 2, stride=2, device=device)]
    return nn.Sequential(*layers)


class LLLiteModule(LayerAdapter):
    """The LLLite adapter of one ``nn.Linear`` (formula in the module docstring).

    ``cond_emb`` is the control-image embedding as tokens ``[B, h*w, cond_emb_dim]`` (row-major,
    the order a linear-projection ``Transformer2DModel`` flattens its grid in), or None: then the
    layer runs unchanged. A batch that is a multiple of the embedding's (classifier-free guidance
    runs ``[uncond, cond]``) reuses the embedding for every block of rows.
    """

    def __init__(self, lllite_name: str, org_module: nn.Linear, *, depth: int, cond_emb_dim: int, mlp_dim: int,
                 dropout: float | None = None, multiplier: float = 1.0) -> None:
        if not isinstance(org_module, nn.Linear):
            raise TypeError(f"LLLite module {lllite_name}: only nn.Linear layers are supported, got "
                            f"{type(org_module).__name__}")
        super().__init__(lllite_name, org_module, multiplier)
        weight = org_module.weight
        device = weight.device if weight.is_meta else None  # shape-only models stay shape-only
        in_dim = org_module.in_features
        self.depth, self.cond_emb_dim, self.mlp_dim = int(depth), int(cond_emb_dim), int(mlp_dim)
        self.dropout = float(dropout or 0.0)
        self.conditioning1 = conditioning_embedding(self.depth, self.cond_emb_dim, device)
        self.down = nn.Sequential(nn.Linear(in_dim, self.mlp_dim, device=device), nn.ReLU())
        self.mid = nn.Sequential(nn.Linear(self.mlp_dim + self.cond_emb_dim, self.mlp_dim, device=device), nn.ReLU())
        self.up = nn.Sequential(nn.Linear(self.mlp_dim, in_dim, device=device))
        nn.init.zeros_(self.up[0].weight)
        nn.init.zeros_(self.up[0].bias)
        self.cond_emb: torch.Tensor | None = None

    @property
    def lllite_name(self) -> str:
        """The file-format name (``lllite_unet_...``), the prefix of this module's keys."""
        return self.lora_name

    def set_cond_image(self, image: torch.Tensor | None) -> None:
        """Embed ``image`` ([B,3,H,W] in [-1, 1]; None: no control). Runs with gradients when the
        caller does (training); wrap in ``torch.no_grad()`` for inference."""
        if image is None:
            self.cond_emb = None
            return
        param = self.conditioning1[0].weight
        emb = self.conditioning1(image.to(param.device, param.dtype))
        self.cond_emb = emb.flatten(2).transpose(1, 2)  # [B, C, h, w] -> [B, h*w, C]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        cond = self.cond_emb
        if cond is None or self.multiplier == 0.0:
            return self.org_forward(x, *args, **kwargs)
        if x.shape[0] != cond.shape[0]:
            if x.shape[0] % cond.shape[0]:
                raise LLLiteError(f"{self.lllite_name}: a batch of {x.shape[0]} cannot use {cond.shape[0]} control "
                                  "image(s); give one control image per image (or one for all)")
            cond = cond.repeat(x.shape[0] // cond.shape[0], 1, 1)
        if cond.shape[1] != x.shape[1]:
            raise LLLiteError(f"{self.lllite_name}: the control image gives {cond.shape[1]} tokens but the layer sees "
                              f"{x.shape[1]}; the control image must have the generated image's size, with sides that "
                              "are multiples of 32")
        hidden = self.down(x)
        hidden = self.mid(torch.cat([cond.to(hidden.dtype), hidden], dim=-1))
        if self.dropout and self.training:
            hidden = F.dropout(hidden, p=self.dropout, training=True)
        return self.org_forward(x + self.up(hidden) * self.multiplier, *args, **kwargs)

    def merge_to_layer(self, device=None) -> None:
        raise NotImplementedError("ControlNet-LLLite depends on the control image and cannot be merged into weights")

    def extra_repr(self) -> str:
        return (f"name={self.lllite_name}, depth={self.depth}, cond_emb_dim={self.cond_emb_dim}, "
                f"mlp_dim={self.mlp_dim}, multiplier={self.multiplier:g}")


@dataclasses.dataclass(frozen=True)
class PlannedLLLite:
    """One module to create: file-format name, the layer, and the U-Net level depth (1..3)."""

    name: str
    layer: nn.Linear
    depth: int


def _unet_names(unet: nn.Module) -> dict[str, tuple[str, nn.Linear]]:
    """``{lllite name: (diffusers path, layer)}`` for every Linear of an SDXL U-Net."""
    if not is_sdxl_unet(unet):
        raise LLLiteError("ControlNet-LLLite is for SDXL U-Nets (addition_embed_type 'text_time'); this U-Net is not "
                          "SDXL: load an SDXL base model")
    scope = dataclasses.replace(sdxl_unet_scope(unet), prefix=LLLITE_PREFIX)
    names = {}
    for path, layer in unet.named_modules():
        if isinstance(layer, nn.Linear):
            name = scope.lora_name(path)
            if name is not None:
                names[name] = (path, layer)
    return names


def _depth_of(unet: nn.Module, path: str) -> int:
    """The level depth of a diffusers path: down block i -> i + 1, the middle block -> the number of
    levels, up block i -> levels - i (the level's token grid is image / 2**(depth + 2))."""
    levels = len(unet.down_blocks)
    parts = path.split(".")
    if parts[0] == "down_blocks":
        depth = int(parts[1]) + 1
    elif parts[0] == "up_blocks":
        depth = levels - int(parts[1])
    else:
        depth = levels
    if not 1 <= depth <= MAX_DEPTH:
        raise LLLiteError(f"{path}: LLLite embeds the control image for U-Net levels 1..{MAX_DEPTH}, this layer is on "
                          f"level {depth}")
    return depth


def plan_lllite(unet: nn.Module) -> list[PlannedLLLite]:
    """The modules of a fresh network: the reference's targets (module docstring), in model order."""
    planned = []
    for name, (path, layer) in _unet_names(unet).items():
        if _TARGET_PATH.match(path):
            planned.append(PlannedLLLite(name, layer, _depth_of(unet, path)))
    if not planned:
        raise LLLiteError("this SDXL U-Net has no attention layers in its down or middle blocks for LLLite to adapt")
    return planned


def _depth_from_keys(keys: Mapping[str, torch.Tensor], name: str, source: str) -> int:
    if f"{name}.conditioning1.4.weight" in keys:
        return 3
    second = keys.get(f"{name}.conditioning1.2.weight")
    if second is None:
        raise LLLiteError(f"{source}: {name} has no conditioning1.2.weight; the file is not a complete LLLite network")
    return 2 if second.shape[-1] == 4 else 1


def lllite_dims(weights_sd: Mapping[str, torch.Tensor], source: str = "weights") -> tuple[int, int]:
    """``(cond_emb_dim, mlp_dim)`` of an LLLite state dict (raises :class:`LLLiteError` if it is none)."""
    cond = next((v for k, v in weights_sd.items() if k.endswith(".conditioning1.0.weight")), None)
    down = next((v for k, v in weights_sd.items() if k.endswith(".down.0.weight")), None)
    if cond is None or down is None or not all(k.startswith(LLLITE_PREFIX + "_") for k in weights_sd):
        raise LLLiteError(f"{source}: not a ControlNet-LLLite file (expected lllite_unet_*.conditioning1/down/mid/up "
                          f"keys, found e.g. {format_key_list(list(weights_sd), 3)})")
    return int(cond.shape[0]) * 2, int(down.shape[0])


class ControlNetLLLite(nn.Module):
    """A set of :class:`LLLiteModule` s registered under their file-format names.

    ``state_dict()`` is the file's content. Methods follow the network plug-in API where it applies
    (``apply_to``, ``restore``, ``set_multiplier``, ``load_weights``, ``save_weights``,
    ``prepare_optimizer_params``, ``prepare_grad_etc``, ``on_epoch_start``, ``get_trainable_params``,
    ``is_mergeable``), plus :meth:`set_cond_image`.
    """

    def __init__(self, planned: list[PlannedLLLite], *, cond_emb_dim: int, mlp_dim: int, dropout: float | None = None,
                 multiplier: float = 1.0) -> None:
        super().__init__()
        if cond_emb_dim < 2 or cond_emb_dim % 2:
            raise LLLiteError(f"--cond_emb_dim must be an even number of at least 2, got {cond_emb_dim}")
        if mlp_dim < 1:
            raise LLLiteError(f"--network_dim (the LLLite mlp_dim) must be at least 1, got {mlp_dim}")
        self.cond_emb_dim, self.mlp_dim, self.multiplier = int(cond_emb_dim), int(mlp_dim), float(multiplier)
        self.unet_modules: list[LLLiteModule] = []
        for plan in planned:
            module = LLLiteModule(plan.name, plan.layer, depth=plan.depth, cond_emb_dim=cond_emb_dim, mlp_dim=mlp_dim,
                                  dropout=dropout, multiplier=multiplier)
            self.add_module(plan.name, module)
            self.unet_modules.append(module)
        logger.info("ControlNet-LLLite: %d modules (cond_emb_dim %d, mlp_dim %d)", len(self.unet_modules),
                    self.cond_emb_dim, self.mlp_dim)

    def forward(self, *args, **kwargs):  # the modules run inside the U-Net's layers
        raise RuntimeError("ControlNetLLLite is not called directly: apply_to() hooks it into the U-Net")

    # --- hooking and control ------------------------------------------------------------------
    def apply_to(self, *_args: Any, **_kwargs: Any) -> None:
        """Hook every module into its layer (model arguments accepted for the plug-in API)."""
        for module in self.unet_modules:
            module.apply_to()

    def restore(self) -> None:
        for module in reversed(self.unet_modules):
            module.restore()

    def set_cond_image(self, image: torch.Tensor | None) -> None:
        """Control image(s) ``[B,3,H,W]`` in ``[0, 1]`` (the dataset's ``conditioning_images``), or
        None to switch control off. The modules see it in ``[-1, 1]``, the range the reference trains
        and generates with."""
        scaled = None if image is None else image * 2.0 - 1.0
        for module in self.unet_modules:
            module.set_cond_image(scaled)

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = float(multiplier)
        for module in self.unet_modules:
            module.set_multiplier(multiplier)

    # --- loading and saving -------------------------------------------------------------------
    def load_weights(self, file: str | os.PathLike) -> Any:
        return self.load_state_dict_checked(load_weights_file(file), str(file))

    def load_state_dict_checked(self, weights_sd: Mapping[str, torch.Tensor], source: str = "weights") -> Any:
        """``load_state_dict(strict)`` with errors naming the keys and shapes that do not fit."""
        own = self.state_dict()
        unexpected = sorted(set(weights_sd) - set(own))
        missing = sorted(set(own) - set(weights_sd))
        if unexpected or missing:
            raise LLLiteError(f"{source}: the file does not match this LLLite network ({len(unexpected)} unknown keys, "
                              f"e.g. {format_key_list(unexpected, 3)}; {len(missing)} missing, e.g. "
                              f"{format_key_list(missing, 3)}); load it with the SDXL model and --cond_emb_dim/"
                              "--network_dim it was trained with")
        for key, value in weights_sd.items():
            if tuple(value.shape) != tuple(own[key].shape):
                raise LLLiteError(f"{source}: {key} has shape {list(value.shape)} in the file but "
                                  f"{list(own[key].shape)} in this network (--cond_emb_dim {self.cond_emb_dim}, "
                                  f"--network_dim {self.mlp_dim}); use the dims the file was trained with")
        return self.load_state_dict(dict(weights_sd), strict=True)

    def save_weights(self, file: str | os.PathLike, dtype: torch.dtype | None = None,
                     metadata: Mapping[str, Any] | None = None) -> None:
        """Write atomically: ``.safetensors`` with ``metadata`` (values stringified), else ``torch.save``."""
        state = {k: v.detach().to("cpu", dtype=dtype) if dtype is not None else v.detach().cpu()
                 for k, v in self.state_dict().items()}
        if Path(file).suffix.lower() == ".safetensors":
            meta = {str(k): str(v) for k, v in metadata.items()} if metadata else None
            save_safetensors(state, file, meta)
        else:
            save_torch(state, file)

    # --- training hooks -----------------------------------------------------------------------
    def prepare_optimizer_params(self, lr: float | None = None) -> tuple[list[dict[str, Any]], list[str]]:
        group: dict[str, Any] = {"params": list(self.parameters())}
        if lr is not None:
            group["lr"] = lr
        return [group], ["lllite"]

    def prepare_grad_etc(self, *_args: Any) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, *_args: Any) -> None:
        self.train()

    def get_trainable_params(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def enable_gradient_checkpointing(self) -> None:
        """Nothing to do: the modules run inside the U-Net blocks, which checkpoint themselves."""

    def is_mergeable(self) -> bool:
        return False


def create_network(unet: nn.Module, cond_emb_dim: int | None = None, mlp_dim: int | None = None, *,
                   dropout: float | None = None, multiplier: float = 1.0) -> ControlNetLLLite:
    """A fresh network for an SDXL U-Net (``cond_emb_dim``/``mlp_dim`` default 16 each, as the reference)."""
    return ControlNetLLLite(plan_lllite(unet), cond_emb_dim=cond_emb_dim or DEFAULT_COND_EMB_DIM,
                            mlp_dim=mlp_dim or DEFAULT_MLP_DIM, dropout=dropout, multiplier=multiplier)


def create_network_from_weights(unet: nn.Module, file: str | os.PathLike | None = None, *,
                                weights_sd: Mapping[str, torch.Tensor] | None = None, multiplier: float = 1.0,
                                dropout: float | None = None) -> ControlNetLLLite:
    """A network shaped exactly as a file describes it (dims from the tensors, any of the U-Net's
    Linear layers the file names), with the file's weights loaded."""
    source = str(file) if file is not None else "weights"
    if weights_sd is None:
        if file is None:
            raise ValueError("create_network_from_weights needs a file or weights_sd")
        weights_sd = load_weights_file(file)
    cond_emb_dim, mlp_dim = lllite_dims(weights_sd, source)
    layers = _unet_names(unet)
    names = {k.partition(".")[0] for k in weights_sd}
    unknown = sorted(n for n in names if n not in layers)
    if unknown:
        raise LLLiteError(f"{source}: {len(unknown)} LLLite modules name no Linear layer of this U-Net, e.g. "
                          f"{format_key_list(unknown, 3)}; load the file with the SDXL model it was trained for")
    planned = []
    for name in (n for n in layers if n in names):  # model order
        path, layer = layers[name]
        depth = _depth_from_keys(weights_sd, name, source)
        if depth != _depth_of(unet, path):
            raise LLLiteError(f"{source}: {name} embeds the control image for U-Net level {depth}, but this model's "
                              f"layer is on level {_depth_of(unet, path)}; load the file with the SDXL model it was "
                              "trained for")
        planned.append(PlannedLLLite(name, layer, depth))
    network = ControlNetLLLite(planned, cond_emb_dim=cond_emb_dim, mlp_dim=mlp_dim, dropout=dropout, multiplier=multiplier)
    network.load_state_dict_checked(weights_sd, source)
    return network
