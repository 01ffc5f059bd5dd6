"""Thin command lines, one per job (``python -m jobs.NAME --help``): parse the options, call one function of
``pipelines``, return its exit code. Nothing imports ``jobs``.
"""
