"""Text in: listing a corpus, reading its files into documents, the tokenizer, and chunking semantics.

May import ``pipelines.artifacts`` and ``pipelines.runtime``.
"""
