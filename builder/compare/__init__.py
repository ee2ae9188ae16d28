"""Image comparison: ``lbuild diff`` (the semantic diff of two images) and ``lbuild repro-check``.

- ``source``  opens an image from an OCI layout, a docker-archive tar or lbuild's store (through
              a resolver the caller supplies) and streams its layer tars member by member;
- ``diff``    compares two images level by level (index, manifest, config, layers, tar entries);
- ``repro``   runs N builds under varied conditions and compares them;
- ``report``  renders a diff or a repro-check as text, a rich table, or JSON.

Nothing here imports the build pipeline at module level: ``lbuild diff`` starts fast.
"""
