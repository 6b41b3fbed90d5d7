"""Shared pytest fixtures: tiny SD and SDXL checkpoints written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from library.demo.tiny_sd import write_tiny_sd_checkpoint, write_tiny_sd_diffusers

# pytest-xdist runs two workers on the 2 CPU cores: one thread each (and in every subprocess they
# start) keeps OpenMP from oversubscribing the cores, which made subprocess runs ~9x slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sd1_ckpt(tmp_path_factory) -> Path:
    """A tiny SD1 single-file checkpoint (.safetensors, fp32, LDM keys)."""
    return write_tiny_sd_checkpoint(tmp_path_factory.mktemp("tiny_sd1") / "tiny_sd1.safetensors", v2=False)


@pytest.fixture(scope="session")
def tiny_sd2_ckpt(tmp_path_factory) -> Path:
    """A tiny SD2 single-file checkpoint (.safetensors, fp32, LDM keys, OpenCLIP text encoder)."""
    return write_tiny_sd_checkpoint(tmp_path_factory.mktemp("tiny_sd2") / "tiny_sd2.safetensors", v2=True)


@pytest.fixture(scope="session")
def tiny_sd1_diffusers(tmp_path_factory) -> Path:
    """The tiny SD1 model (same weights as ``tiny_sd1_ckpt``) as a Diffusers folder."""
    return write_tiny_sd_diffusers(tmp_path_factory.mktemp("tiny_sd1_diffusers") / "model", v2=False)


@pytest.fixture(scope="session")
def tiny_sd2_diffusers(tmp_path_factory) -> Path:
    """The tiny SD2 model (same weights as ``tiny_sd2_ckpt``) as a Diffusers folder (linear projections)."""
    return write_tiny_sd_diffusers(tmp_path_factory.mktemp("tiny_sd2_diffusers") / "model", v2=True)


@pytest.fixture(scope="session")
def tiny_sdxl_ckpt(tmp_path_factory) -> Path:
    """A tiny SDXL base single file (.safetensors, fp32, SAI/SGM keys)."""
    from library.demo.tiny_sdxl import write_tiny_sdxl_checkpoint

    return write_tiny_sdxl_checkpoint(tmp_path_factory.mktemp("tiny_sdxl") / "tiny_sdxl.safetensors")


@pytest.fixture(scope="session")
def tiny_sdxl_diffusers(tmp_path_factory) -> Path:
    """The tiny SDXL model (same weights as ``tiny_sdxl_ckpt``) as a Diffusers folder."""
    from library.demo.tiny_sdxl import write_tiny_sdxl_diffusers

    return write_tiny_sdxl_diffusers(tmp_path_factory.mktemp("tiny_sdxl_diffusers") / "model")


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory):
    """A tiny FLUX.1-dev setup (DiT, AE, CLIP-L, T5 and a T5 tokenizer folder) in the real file layouts."""
    from library.demo.tiny_flux import write_tiny_flux_setup

    return write_tiny_flux_setup(tmp_path_factory.mktemp("tiny_flux"), guidance_embed=True)


@pytest.fixture(scope="session")
def tiny_flux_schnell(tmp_path_factory):
    """The schnell-style variant (no guidance embedding)."""
    from library.demo.tiny_flux import write_tiny_flux_setup

    return write_tiny_flux_setup(tmp_path_factory.mktemp("tiny_flux_schnell"), guidance_embed=False)


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory):
    """A tiny SD3.5-Medium-style all-in-one checkpoint (MMDiT-X, VAE, CLIP-L, CLIP-G, T5) and tokenizer folder."""
    from library.demo.tiny_sd3_encoders import write_tiny_sd3_setup

    return write_tiny_sd3_setup(tmp_path_factory.mktemp("tiny_sd35m"), "sd35_medium")


@pytest.fixture(scope="session")
def tiny_sd3_separate(tmp_path_factory):
    """A tiny SD3-Medium checkpoint without text encoders, and the encoders as separate files."""
    from library.demo.tiny_sd3_encoders import write_tiny_sd3_setup

    return write_tiny_sd3_setup(tmp_path_factory.mktemp("tiny_sd3m"), "sd3_medium", with_text_encoders=False,
                                separate_files=True)
