"""Using what was built and trained: querying a build, sampling from a RETRO checkpoint with retrieval.

May import ``pipelines.train`` (checkpoints, the vocabulary map) and everything below it.
"""
