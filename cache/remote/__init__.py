"""Sharing the cache beyond one machine: step records and their blobs as an OCI artifact, in an
OCI image layout (``type=local``) or a distribution registry (``type=registry``).
"""
