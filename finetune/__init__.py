"""Preparation scripts for the fine-tuning metadata workflow (``--in_json`` / ``metadata_file``).

``merge_captions_to_metadata.py`` and ``merge_dd_tags_to_metadata.py`` collect caption / tag
files into one JSON file, ``clean_captions_and_tags.py`` tidies it, and
``prepare_buckets_latents.py`` assigns buckets and writes ``<stem>.npz`` latent caches. The shared
file handling lives in :mod:`finetune.metadata_io`. User guide: docs/finetune_metadata.md.
"""
