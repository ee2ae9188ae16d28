"""The content store: blobs named by sha256, verified while written, read-only once committed.
"""
