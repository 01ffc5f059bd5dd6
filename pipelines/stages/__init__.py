"""The build stages (tokenize, embed, index with its distributed build, neighbors) and the build driver.

May import ``models``, ``pipelines.search``, ``pipelines.text``, ``pipelines.artifacts``, ``pipelines.runtime``.
"""
