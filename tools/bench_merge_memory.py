"""Peak memory of merging a LoRA into a full-size checkpoint (networks/merge_lora.py, sdxl_merge_lora.py).

    python tools/bench_merge_memory.py --kind sd15|sdxl|sdxl_half [--workdir /tmp/merge_bench]

Writes a checkpoint with the real single-file key list (../shared/reference/checkpoint_keys.json,
random fp16 values; ``sdxl_half`` halves every width for machines with less disk) and a rank-8
LoRA on every layer of the real LoRA key list, runs the merge tool in a child process, and prints
its peak resident memory and wall time. The merge streams the checkpoint tensor by tensor, so the
peak stays near the size of Python with torch imported plus the largest tensor, whatever the
checkpoint's size.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
REFERENCE = REPO.parent / "shared" / "reference"


def write_synthetic(path: Path, keys: dict, half: bool, dtype_of, scale: float, seed: int) -> float:
    import torch

    from library.model_tools.tensor_files import SafetensorsWriter, TensorInfo

    def shape_of(shape):
        return tuple(d if (not half or d < 32 or d in (49408, 77)) else d // 2 for d in shape)

    generator = torch.Generator().manual_seed(seed)
    layout = [TensorInfo(k, dtype_of(k), shape_of(s)) for k, s in keys.items()]
    with SafetensorsWriter(path, layout, {"test": "synthetic"}) as writer:
        for info in layout:
            if info.dtype == torch.int64:
                tensor = torch.arange(math.prod(info.shape), dtype=torch.int64).reshape(info.shape) % 77
            elif info.name.endswith(".alpha"):
                tensor = torch.tensor(4.0, dtype=info.dtype)
            else:
                tensor = (torch.randn(info.shape, generator=generator) * scale).to(info.dtype)
            writer.write(info.name, tensor)
    return sum(i.nbytes for i in layout) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kind", choices=("sd15", "sdxl", "sdxl_half"), default="sd15")
    parser.add_argument("--workdir", default="/tmp/merge_bench")
    opts = parser.parse_args()

    import torch

    work = Path(opts.workdir)
    work.mkdir(parents=True, exist_ok=True)
    sdxl = opts.kind.startswith("sdxl")
    checkpoint_keys = json.loads((REFERENCE / "checkpoint_keys.json").read_text())
    lora_keys = json.loads((REFERENCE / "lora_keys.json").read_text())
    ckpt, lora = work / f"{opts.kind}.safetensors", work / f"{opts.kind}_lora.safetensors"
    half = opts.kind.endswith("_half")
    size = write_synthetic(ckpt, checkpoint_keys["sdxl_single_file_keys" if sdxl else "sd15_single_file_keys"], half,
                           lambda k: torch.int64 if k.endswith("position_ids") else torch.float16, 0.02, 0)
    write_synthetic(lora, lora_keys["sdxl_lora_dim8" if sdxl else "sd1_lora_dim8"], half, lambda k: torch.float16, 0.05, 1)
    tool = "sdxl_merge_lora.py" if sdxl else "merge_lora.py"
    started = time.time()
    subprocess.run([sys.executable, str(REPO / "networks" / tool), "--sd_model", str(ckpt), "--models", str(lora),
                    "--save_to", str(work / "merged.safetensors"), "--save_precision", "fp16",
                    "--console_log_level", "WARNING"], check=True)
    seconds = time.time() - started
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6  # KiB on Linux
    print(f"{opts.kind}: checkpoint {size:.2f} GiB, merge peak RSS {peak_gb:.2f} GB, {seconds:.0f} s")


if __name__ == "__main__":
    main()
