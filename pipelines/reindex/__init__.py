"""Keeping a published build current: scan the corpus, append new documents, update the index and neighbors,
then publish under a lock (``python -m jobs.reindex``).

May import ``pipelines.stages`` and everything below it; not ``pipelines.train``.
"""
