"""The distribution (OCI registry) client: references, auth, transport, pull and push.

A thin client of lbuild's own on httpx: raw manifest bytes are kept, every manifest and
blob is verified against its digest while it streams, blobs go into the content store once.
This package imports nothing from ``builder``.
"""
