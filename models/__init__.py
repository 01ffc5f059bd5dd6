"""Single-device PyTorch models and their kernels: RETRO, the Memorizing Transformer with its kNN memory,
product-key memory, the chunk encoder.

Imports no Ray, no ``pipelines`` and no ``jobs``: the layer everything else stands on.
"""
