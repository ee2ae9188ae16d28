"""Layers: deterministic tar writing and reading, tables of contents, the verified applier,
and the merged view of a chain of layers computed from their tables of contents.
"""
