"""The models the benchmarks train, and their small generated dataset.

* ``tiny``: the bundled demo model ``models/shapes_demo_sd1.safetensors`` (SD1 layout, 10.5 M
  parameters, trained weights).
* ``sd15``: the full-size SD 1.5 architecture with random weights -- diffusers
  ``UNet2DConditionModel`` with the SD 1.5 config, transformers ``CLIPTextModel`` with the CLIP
  ViT-L/14 text config, ``AutoencoderKL`` with the SD VAE config -- converted with the project's
  own LDM maps (``library.families.sd.checkpoint``) and written once as a single-file checkpoint
  (``library.model_tools.checkpoints.save_single_file``, atomic) into the bench work folder, where
  later runs find it. :func:`sd15_dry_run` does the same on the ``meta`` device (no memory, no
  file): parameter counts, the LDM key count, the configs the project's loader reads back from the
  converted keys, and the LoRA module count.
"""

from __future__ import annotations

import gc
import logging
import tempfile
from pathlib import Path
from typing import Any

from bench.common import REPO

logger = logging.getLogger(__name__)

DEMO_MODEL = REPO / "models" / "shapes_demo_sd1.safetensors"
MODELS = ("tiny", "sd15")

# Stable Diffusion 1.5 (runwayml/stable-diffusion-v1-5 unet/vae/text_encoder config.json values).
SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280), "cross_attention_dim": 768, "attention_head_dim": 8,
    "norm_num_groups": 32, "use_linear_projection": False,
}
SD15_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "sample_size": 512,
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512), "norm_num_groups": 32,
}
CLIP_L_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768,
}


def build_sd15(device: str = "cpu", seed: int = 0):
    """``(unet, vae, text_encoder)`` of the SD 1.5 architecture; random (default-initialised) weights
    from ``seed``, or shape-only on ``device="meta"``."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        vae = AutoencoderKL(**SD15_VAE_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT_CONFIG))
    return unet, vae, text_encoder


def ldm_state_dict(unet, vae, text_encoder) -> dict:
    """The three models as one SD single-file state dict, through the project's diffusers -> LDM maps."""
    from library.families.sd.checkpoint import (TextEncoderShape, UNetShape, VAEShape, clip_diffusers_to_ldm,
                                                unet_diffusers_to_ldm, vae_diffusers_to_ldm)

    return {
        **unet_diffusers_to_ldm(unet.state_dict(), UNetShape.from_diffusers_config(unet.config)),
        **vae_diffusers_to_ldm(vae.state_dict(), VAEShape.from_diffusers_config(vae.config)),
        **clip_diffusers_to_ldm(text_encoder.state_dict(),
                                TextEncoderShape.from_transformers_config(text_encoder.config, "clip_l")),
    }


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def sd15_dry_run(network_dim: int = 8) -> dict[str, Any]:
    """Everything :func:`write_sd15_checkpoint` does, on ``meta`` (see the module docstring)."""
    import networks.lora
    from library.families.sd.loading import load_sd_models

    unet, vae, text_encoder = build_sd15("meta")
    ldm = ldm_state_dict(unet, vae, text_encoder)
    with tempfile.TemporaryDirectory() as tmp:
        placeholder = Path(tmp) / "sd15_dry_run.safetensors"  # never read: the tensors are given
        placeholder.touch()
        loaded = load_sd_models(placeholder, v2=False, state_dict=ldm, device="meta", keep_extras=False)
    mismatched = [k for k, v in SD15_UNET_CONFIG.items() if _as_tuple(loaded.unet.config.get(k)) != _as_tuple(v)]
    mismatched += [f"vae.{k}" for k, v in SD15_VAE_CONFIG.items() if _as_tuple(loaded.vae.config.get(k)) != _as_tuple(v)]
    mismatched += [f"te.{k}" for k, v in CLIP_L_TEXT_CONFIG.items()
                   if k != "projection_dim" and getattr(loaded.text_encoder.config, k) != v]
    network = networks.lora.create_network(1.0, network_dim, network_dim, loaded.vae, loaded.text_encoder,
                                           loaded.unet)
    bytes_fp32 = sum(t.numel() for t in ldm.values()) * 4
    return {
        "unet_params": _count(unet), "vae_params": _count(vae), "text_encoder_params": _count(text_encoder),
        "ldm_keys": len(ldm), "checkpoint_gib_fp32": bytes_fp32 / 2**30,
        "loaded_unet_params": _count(loaded.unet), "loaded_vae_params": _count(loaded.vae),
        "loaded_text_encoder_params": _count(loaded.text_encoder), "config_mismatches": mismatched,
        "lora_modules": len(network.unet_loras) + len(network.text_encoder_loras),
        "lora_params": _count(network),
    }


def _as_tuple(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def write_sd15_checkpoint(path: Path, *, seed: int = 0, dtype: str = "fp32") -> Path:
    """Build the random SD 1.5 models and write them as one LDM-layout single file (atomic)."""
    import torch

    from library.model_tools.checkpoints import save_single_file

    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    logger.info("building the SD 1.5 architecture with random weights (seed %d) ...", seed)
    with torch.no_grad():
        state = {k: v.detach().to(torch_dtype).contiguous() for k, v in ldm_state_dict(*build_sd15("cpu", seed)).items()}
    gc.collect()  # the models are gone; only the converted tensors stay
    logger.info("writing %s (%.2f GiB)", path, sum(t.numel() * t.element_size() for t in state.values()) / 2**30)
    save_single_file(state, path, metadata={"bench": f"random SD 1.5 architecture, seed {seed}"})
    return path


def prepare_model(name: str, workdir: Path, *, seed: int = 0, dtype: str = "fp32") -> Path:
    """The checkpoint of model ``name`` (``tiny`` or ``sd15``); the sd15 file is built on first use."""
    if name not in MODELS:
        raise ValueError(f"unknown bench model {name!r}; choose one of {', '.join(MODELS)}")
    path = checkpoint_path(name, workdir, seed=seed, dtype=dtype)
    if name == "sd15" and not path.is_file():
        write_sd15_checkpoint(path, seed=seed, dtype=dtype)
    return path


def dataset_path(workdir: Path, *, resolution: int, images: int, name: str = "data") -> Path:
    return workdir / f"{name}_{resolution}px_{images}"


def checkpoint_path(name: str, workdir: Path, *, seed: int = 0, dtype: str = "fp32") -> Path:
    """Where model ``name``'s checkpoint is (tiny) or will be written (sd15)."""
    return DEMO_MODEL if name == "tiny" else workdir / f"sd15_random_seed{seed}_{dtype}.safetensors"


def prepare_dataset(workdir: Path, *, resolution: int, images: int, name: str = "data") -> Path:
    """A ``--train_data_dir`` with one DreamBooth folder ``10_sks`` of ``images`` generated shape
    pictures (``resolution`` px square, captions ``sks, a <colour> <shape> on a <colour> background``)."""
    from library.demo.shapes import write_shapes_folder

    root = dataset_path(workdir, resolution=resolution, images=images, name=name)
    folder = root / "10_sks"
    if len(list(folder.glob("*.png"))) != images:
        write_shapes_folder(folder, images, seed=1, size=(resolution, resolution), trigger="sks")
    return root


def main(argv: list[str] | None = None) -> None:
    """``python -m bench.models --dry_run`` prints what the sd15 build would make."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry_run", action="store_true", help="build sd15 on meta and print the counts")
    args = parser.parse_args(argv)
    if args.dry_run:
        print(json.dumps(sd15_dry_run(), indent=2))


if __name__ == "__main__":
    main()
