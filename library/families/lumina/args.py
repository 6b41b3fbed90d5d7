"""The flags of lumina_train_network.py (kohya's ``add_lumina_train_arguments``) and its parser.

The parser is train_network.py's (every common network-trainer flag) plus the DiT flags
(``library.args.add_dit_training_arguments``: caching, weighting scheme, block swap) plus these.
Names and defaults are the reference's: ``--timestep_sampling shift``, ``--discrete_flow_shift 6.0``,
``--model_prediction_type raw``, ``--gemma2_max_token_length`` 256 when unset.
"""

from __future__ import annotations

import argparse

LUMINA_TIMESTEP_SAMPLINGS = ["sigma", "uniform", "sigmoid", "shift", "nextdit_shift"]


def add_lumina_training_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Lumina-Image 2.0")
    g.add_argument("--gemma2", type=str, default=None,
                   help="Gemma-2 text encoder: a .safetensors file or a transformers folder (gemma-2-2b)")
    g.add_argument("--ae", type=str, default=None, help="the FLUX.1 autoencoder file (ae.safetensors)")
    g.add_argument("--gemma2_max_token_length", type=int, default=None,
                   help="Gemma-2 tokens per caption, system prompt included (default 256)")
    g.add_argument("--timestep_sampling", type=str, default="shift", choices=LUMINA_TIMESTEP_SAMPLINGS,
                   help="how training noise levels are drawn (default shift; nextdit_shift: the resolution-dependent "
                        "shift of NextDiT training; see docs/lumina_train_network.md)")
    g.add_argument("--sigmoid_scale", type=float, default=1.0,
                   help="scale of the normal draw for sigmoid/shift sampling")
    g.add_argument("--model_prediction_type", type=str, default="raw", choices=["raw", "additive", "sigma_scaled"],
                   help="how the model output is read: raw (default), additive, sigma_scaled")
    g.add_argument("--discrete_flow_shift", type=float, default=6.0,
                   help="shift of the flow-matching schedule for shift and sigma sampling (default 6.0)")
    g.add_argument("--use_flash_attn", action="store_true",
                   help="accepted for compatibility: attention always runs through PyTorch SDPA, which picks the "
                        "fastest kernel it has")
    g.add_argument("--use_sage_attn", action="store_true",
                   help="accepted for compatibility: attention always runs through PyTorch SDPA")
    g.add_argument("--system_prompt", type=str, default="",
                   help="text put before every caption and preview prompt as '<system prompt> <Prompt Start> "
                        "<caption>' (default: none)")
    g.add_argument("--sample_batch_size", type=int, default=None,
                   help="accepted for compatibility: previews are generated one prompt at a time")


def setup_lumina_network_parser() -> argparse.ArgumentParser:
    """The parser of lumina_train_network.py: train_network.py's flags plus the DiT and Lumina ones."""
    from library.args import add_dit_training_arguments, setup_network_parser

    parser = setup_network_parser()
    parser.description = "Train a LoRA (or another network module) for Lumina-Image 2.0"
    add_dit_training_arguments(parser)
    add_lumina_training_arguments(parser)
    return parser
