"""Train a ControlNet for FLUX.1 dev/schnell on images and their conditioning images.

    accelerate launch flux_train_control_net.py --pretrained_model_name_or_path flux1-dev.safetensors \
        --clip_l clip_l.safetensors --t5xxl t5xxl_fp16.safetensors --ae ae.safetensors \
        --train_data_dir images --conditioning_data_dir conditioning --resolution 512 \
        --output_dir out --output_name my_flux_controlnet --learning_rate 1e-5 --guidance_scale 1.0

Same flags as kohya-ss/sd-scripts' flux_train_control_net.py; writes one ``.safetensors`` file in
the reference's ControlNet layout. See docs/flux_train_control_net.md.
"""

from __future__ import annotations

import sys

from library.training.entry import main as train_main


def setup_parser():
    from library.families.flux.controlnet_args import setup_flux_controlnet_parser

    return setup_flux_controlnet_parser()


def main(argv: list[str] | None = None) -> None:
    train_main(setup_parser, "library.families.flux.family:FluxFamily", argv,
               target="library.families.flux.controlnet_target:FluxControlNetTarget")


if __name__ == "__main__":
    main(sys.argv[1:])
