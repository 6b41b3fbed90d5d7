"""Generate images with Stable Diffusion 1.x/2.x and SDXL (``--sdxl``).

    python gen_img.py --ckpt model.safetensors --outdir outputs --prompt "a cat --n blurry --d 42" \
        --W 512 --H 512 --steps 30 --sampler euler_a

Same flags as kohya-ss/sd-scripts' gen_img.py for SD 1.x/2.x and SDXL; see docs/gen_img.md.
"""

from __future__ import annotations

import sys

from library.generation.cli import setup_parser, validate_args
from library.log import setup_logging


def main(argv: list[str] | None = None) -> None:
    parser = setup_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    validate_args(parser, args)
    setup_logging(args)
    # torch/diffusers load only once the flags are known to be good: `--help` and flag errors are instant.
    from library.generation.runner import GenerationError, run

    try:
        run(args)
    except GenerationError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
