"""Nearest-neighbor search that stages and the re-index share: exact and filtered k-NN over faiss indexes,
the index key and settings, ground truth and tuning.

May import ``pipelines.artifacts`` and ``pipelines.runtime``.
"""
