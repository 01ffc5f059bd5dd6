"""Training on a build with Ray Train: the shared loop, launcher, checkpoints and metrics, RETRO samples and
Memorizing streams, and one run module per job.

May import ``models``, ``pipelines.artifacts`` and ``pipelines.runtime``; not the build stages or the re-index.
"""
