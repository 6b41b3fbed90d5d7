"""Whole-model tools: checkpoint conversion and merging, streaming tensor files, stand-alone caching.

* :mod:`.tensor_files` — read a checkpoint one tensor at a time, write a ``.safetensors`` file one
  tensor at a time (atomically), so tools never hold two copies of a model;
* :mod:`.checkpoints` — what a file or folder is (SD 1.x/2.x, SDXL, ...), loading it through the
  families' loaders and writing it back as a single file or a Diffusers folder;
* :mod:`.converter_trace` — where each tensor of the loaded models lands in the single file, read
  off the families' own converters (used to merge LoRAs without loading the checkpoint);
* :mod:`.caching` — ``tools/cache_latents.py`` / ``tools/cache_text_encoder_outputs.py``.

User documentation: ``docs/model_tools.md``.
"""
