"""What every job runs on: CLI config dataclasses, the Ray session, process statistics.

Imports nothing of ``pipelines``: every other wing may use it.
"""
