"""Automatic captioning and tagging (``finetune/make_captions*.py``, ``finetune/tag_images_by_wd14_tagger.py``).

One concern per module; nothing heavy (torch, transformers, onnxruntime) is imported at import
time, so the scripts' ``--help`` is instant and the tagger imports without onnxruntime.

* :mod:`~library.captioning.errors` -- :class:`CaptioningError`, the one-line user error.
* :mod:`~library.captioning.images` -- listing a folder's images, decoding one (alpha on white).
* :mod:`~library.captioning.batches` -- batches of decoded images, unreadable files skipped with a warning.
* :mod:`~library.captioning.caption_files` -- ``<stem><ext>`` paths, atomic writes, reading tags to append to.
* :mod:`~library.captioning.cli` -- the flags the scripts share; user errors as one ``error:`` line.
* :mod:`~library.captioning.runner` -- the loop every script runs: load, infer, write, progress bar.
* :mod:`~library.captioning.hf_models` -- transformers captioners from a repo id or a folder (BLIP, GIT).
* :mod:`~library.captioning.text_cleanup` -- ``--remove_words`` for GIT captions.
* :mod:`~library.captioning.tag_table` -- a tagger's ``selected_tags.csv`` and the tag-name flags.
* :mod:`~library.captioning.tag_rules` -- probabilities to the ordered tag list (thresholds, ratings ...).
* :mod:`~library.captioning.onnx_tagger` -- the onnxruntime session and the WD14 preprocessing.
* :mod:`~library.captioning.tagger_files` -- finding or downloading ``model.onnx`` + ``selected_tags.csv``.
* :mod:`~library.captioning.tag_outputs` -- where tags are written: per-image files or ``--output_path`` JSON / JSONL.

User guide: docs/captioning.md.
"""
