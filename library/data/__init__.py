"""The data pipeline: from image folders and caption files to bucketed training batches.

``params`` (resolved settings) · ``config_schema`` (TOML/JSON schema) · ``subsets`` (reading
folders and metadata files) · ``images`` · ``captions`` · ``buckets`` · ``dataset`` (bucketed
datasets, batches) · ``group`` (what the DataLoader iterates) · ``latent_cache`` · ``collate`` ·
``metadata`` (``ss_*`` dataset keys) · ``debug`` · ``custom`` (``--dataset_class``) · ``errors``.
The entry point is ``library.dataset_config.build_dataset_group``; see docs/dataset_config.md.
"""
