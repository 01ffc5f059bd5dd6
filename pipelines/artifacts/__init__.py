"""The artifact contract in code: storage URLs, manifests, parquet parts, versions and LATEST, tombstones,
embeddings files, and reading chunks by id.

May import ``pipelines.runtime`` only.
"""
