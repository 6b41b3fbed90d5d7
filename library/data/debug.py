"""``--debug_dataset``: print what the trainer would see, batch by batch, without training.

Text only (no image windows): it runs on headless machines and in CI, and the lines can be
compared between runs. Every batch is really built, so unreadable images fail here too.
"""

from __future__ import annotations

import sys
from typing import TextIO


def debug_dataset(group, *, epochs: int = 1, max_batches: int | None = None, out: TextIO | None = None) -> None:
    """Print each batch of ``group`` for ``epochs`` epochs (at most ``max_batches`` per epoch).

    Per batch: bucket size and whether it carries images or cached latents; per sample: image key,
    original size, crop top-left, flip, loss weight and the processed caption.
    """
    out = out or sys.stdout
    n = len(group)
    print(f"dataset: {group.num_train_images} training images, {group.num_reg_images} regularization images "
          f"(with repeats), {n} batches per epoch", file=out)
    for entry in group.bucket_info()["buckets"].values():
        w, h = entry["resolution"]
        print(f"  bucket {w}x{h}: {entry['count']}", file=out)
    for epoch in range(1, epochs + 1):
        group.set_current_epoch(epoch)
        for index in range(n if max_batches is None else min(n, max_batches)):
            batch = group[index]
            h, w = batch["target_sizes_hw"][0].tolist()
            source = "latents" if batch["latents"] is not None else "images"
            tensor = batch["latents"] if batch["latents"] is not None else batch["images"]
            print(f"epoch {epoch} batch {index + 1}/{n}: bucket {w}x{h}, {len(batch['captions'])} sample(s), "
                  f"{source} {tuple(tensor.shape)}", file=out)
            for i, key in enumerate(batch["image_keys"]):
                oh, ow = batch["original_sizes_hw"][i].tolist()
                top, left = batch["crop_top_lefts"][i].tolist()
                print(f"  {key}: original {ow}x{oh}, crop top-left ({top}, {left}), "
                      f"flipped {batch['flippeds'][i]}, loss weight {batch['loss_weights'][i].item():g}", file=out)
                print(f"    caption: {batch['captions'][i]!r}", file=out)
            if "input_ids" in batch:
                print(f"  input_ids {tuple(batch['input_ids'].shape)}", file=out)
