"""lbuild's cache: content store, layers, step records, stat index, snapshotters.

This package never imports ``builder``.
"""
