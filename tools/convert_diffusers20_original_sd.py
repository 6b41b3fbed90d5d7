"""Convert a Stable Diffusion model between a Diffusers folder and a single file (.safetensors / .ckpt).

    python tools/convert_diffusers20_original_sd.py model.safetensors model_diffusers --use_safetensors
    python tools/convert_diffusers20_original_sd.py model_diffusers model.safetensors --fp16
    python tools/convert_diffusers20_original_sd.py --v2 sd21.ckpt sd21_diffusers --unet_use_linear_projection

Same flags as kohya-ss/sd-scripts' tool (SD 1.x/2.x); SDXL base models convert too. The output's
extension decides its form: ``.safetensors``/``.ckpt`` is a single file, anything else a Diffusers
folder. The model version is recognised from the weights, so ``--v1``/``--v2`` are optional (and
checked when given). See docs/model_tools.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/convert_diffusers20_original_sd.py`: import from the repo root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from library.args import add_logging_arguments  # noqa: E402
from library.log import setup_logging  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Convert an SD 1.x/2.x or SDXL model between a Diffusers folder and a single .safetensors/.ckpt "
                    "file.")
    parser.add_argument("--v1", action="store_true", help="the model is SD 1.x (optional: recognised from the weights)")
    parser.add_argument("--v2", action="store_true", help="the model is SD 2.x (optional: recognised from the weights)")
    parser.add_argument("--sdxl", action="store_true", help="the model is SDXL (optional: recognised from the weights)")
    parser.add_argument("--unet_use_linear_projection", action="store_true",
                        help="Diffusers output of an SD 2.x model: Linear proj_in/proj_out in the U-Net "
                             "(use_linear_projection, as Stability's SD 2.x Diffusers models have)")
    parser.add_argument("--fp16", action="store_true", help="load a Diffusers model as fp16 and save as fp16")
    parser.add_argument("--bf16", action="store_true", help="save as bf16")
    parser.add_argument("--float", action="store_true", help="save as float32")
    parser.add_argument("--save_precision_as", type=str, default="no", choices=["no", "fp16", "bf16", "float"],
                        help="precision of the saved model (not together with --fp16/--bf16/--float); default: "
                             "the input's precision")
    parser.add_argument("--epoch", type=int, default=0, help="epoch stored in a .ckpt output")
    parser.add_argument("--global_step", type=int, default=0, help="global step stored in a .ckpt output")
    parser.add_argument("--metadata", type=str, default=None,
                        help='metadata of a .safetensors output as a dict, e.g. \'{"modelspec.title": "my model"}\'')
    parser.add_argument("--variant", type=str, default=None,
                        help="Diffusers weight variant to load, e.g. fp16 (diffusion_pytorch_model.fp16.safetensors)")
    parser.add_argument("--reference_model", type=str, default=None,
                        help="local Diffusers folder whose scheduler/ and tokenizer(s) a Diffusers output takes "
                             "(default: the standard SD scheduler and CLIP tokenizer, made offline)")
    parser.add_argument("--use_safetensors", action="store_true",
                        help="Diffusers output: write .safetensors weights (default .bin); a single file's format "
                             "follows its extension")
    parser.add_argument("model_to_load", type=str, help="Diffusers folder or .safetensors/.ckpt file to convert")
    parser.add_argument("model_to_save", type=str,
                        help="output: a .safetensors/.ckpt file, or a folder for a Diffusers model")
    add_logging_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = setup_parser().parse_args(argv)
    setup_logging(args)
    from library.families.sd.checkpoint import CheckpointError
    from library.model_tools.checkpoints import ModelToolError
    from library.model_tools.convert import convert

    try:
        convert(args)
    except (ModelToolError, CheckpointError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
