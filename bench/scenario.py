"""A generator of the cache benchmark's inputs: a base image context and an app context.

Nothing here is data checked in: every file is made from a seeded PRNG, so two machines
generate byte-identical contexts and the numbers they print compare.  The app context has
about 2,000 small files in nested directories, a few 10 MB files, three stages and several
COPY and COPY --link steps (see ``APP_DOCKERFILE``).
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

MIB = 1 << 20

BASE_DOCKERFILE = """\
FROM scratch
COPY rootfs/ /
"""

# Three stages: a vendored dependency tree on the base image, a docs stage on scratch, and
# the app stage that pulls both in.  The two big --link steps (assets, data) are independent
# of each other and of everything else, which is what --jobs can run side by side.
APP_DOCKERFILE = """\
FROM base AS deps
WORKDIR /opt/deps
COPY deps/ ./
ENV DEPS_HOME=/opt/deps

FROM scratch AS docs
COPY docs/ /usr/share/doc/app/

FROM base
ENV APP_HOME=/app LANG=C.UTF-8
WORKDIR /app
COPY --link assets/ /app/assets/
COPY --link data/ /app/data/
COPY --from=deps /opt/deps /app/vendor
COPY --link --from=docs /usr/share/doc/app /usr/share/doc/app
COPY --link src/ /app/src/
COPY config/ /app/config/
ENV APP_MODE=prod
CMD ["/app/src/main.py"]
"""

# Only the two heavy, independent --link steps: the --jobs 1 vs --jobs 2 comparison.
# Only the two heavy, independent --link steps (its own context: 2 x 128 MiB), so that the
# work --jobs can spread over the cores dominates the fixed cost of a build.
PARALLEL_DOCKERFILE = """\
FROM scratch
COPY --link heavy-a/ /heavy/a/
COPY --link heavy-b/ /heavy/b/
"""

# Every COPY --link: a base bump must rebuild none of them.
LINK_DOCKERFILE = """\
FROM base
ENV APP_HOME=/app
COPY --link src/ /app/src/
COPY --link deps/ /app/vendor/
COPY --link config/ /app/config/
COPY --link assets/ /app/assets/
CMD ["/app/src/main.py"]
"""

HUGE_DOCKERFILE = """\
FROM scratch
COPY huge.bin /huge.bin
"""

WORDS = tuple(
    [
        "alpha",
        "beta",
        "gamma",
        "delta",
        "layer",
        "cache",
        "step",
        "key",
        "blob",
        "digest",
        "tar",
        "gzip",
        "chain",
        "stage",
        "copy",
        "link",
        "base",
        "image",
        "config",
        "manifest",
        "index",
        "store",
        "record",
        "stat",
        "hash",
        "tree",
        "file",
        "path",
        "mode",
    ]
)


@dataclass(frozen=True)
class ScenarioSpec:
    """How big the generated contexts are."""

    src_files: int = 1600
    deps_files: int = 300
    docs_files: int = 80
    config_files: int = 12
    big_files_per_dir: int = 2
    big_size: int = 10 * MIB
    heavy_files: int = 4
    heavy_size: int = 32 * MIB
    seed: int = 3


@dataclass(frozen=True)
class Scenario:
    """Paths of a generated benchmark scenario."""

    root: Path
    base_context: Path
    context: Path
    dockerfile: Path
    parallel_context: Path
    parallel_dockerfile: Path
    edit_file: Path
    bump_file: Path

    @property
    def small_files(self) -> int:
        """Number of files under 1 MiB in the app context (Dockerfiles excluded)."""
        return sum(
            1
            for p in self.context.rglob("*")
            if p.is_file()
            and not p.is_symlink()
            and p.stat().st_size < MIB
            and not p.name.endswith("Dockerfile")
        )

    @property
    def context_bytes(self) -> int:
        """Total size of the regular files in the app context."""
        return sum(
            p.stat().st_size for p in self.context.rglob("*") if p.is_file() and not p.is_symlink()
        )


def _text(rng: random.Random, size: int) -> bytes:
    """Source-like text of about ``size`` bytes."""
    out: list[str] = []
    n = 0
    while n < size:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + "\n"
        out.append(line)
        n += len(line)
    return "".join(out).encode()[:size]


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)


def _tree(rng: random.Random, root: Path, count: int, ext: str, depth: int) -> list[Path]:
    """``count`` small text files spread over nested directories ``depth`` levels deep."""
    files: list[Path] = []
    for i in range(count):
        parts = [f"d{rng.randrange(6)}" for _ in range(rng.randint(1, depth))]
        path = root.joinpath(*parts, f"f{i:04d}{ext}")
        size = int(rng.lognormvariate(7.5, 1.0)) % (64 * 1024) + 16  # median ~1.8 KB
        mode = 0o755 if rng.random() < 0.05 else 0o644
        _write(path, _text(rng, size), mode)
        files.append(path)
    return files


def _big(rng: random.Random, path: Path, size: int) -> None:
    """An incompressible file (like images or archives shipped as assets)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 4 * MIB)
            f.write(rng.randbytes(n))
            left -= n


def generate(root: Path, spec: ScenarioSpec | None = None) -> Scenario:
    """Write the base and app contexts under ``root`` (which must be empty or missing)."""
    spec = spec or ScenarioSpec()
    rng = random.Random(spec.seed)
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty")

    base = root / "base"
    _write(base / "Dockerfile", BASE_DOCKERFILE.encode())
    rootfs = base / "rootfs"
    _write(rootfs / "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/app:/bin/sh\n")
    _write(rootfs / "etc/group", b"root:x:0:\napp:x:1000:\n")
    _write(rootfs / "etc/os-release", b'NAME="bench base"\nVERSION_ID="1"\n')
    _tree(rng, rootfs / "usr/lib/base", 40, ".so.txt", 2)
    _write(rootfs / "usr/bin/tool", _text(rng, 200_000), 0o755)

    ctx = root / "app"
    src = _tree(rng, ctx / "src", spec.src_files, ".py", 4)
    _write(ctx / "src/main.py", b"#!/usr/bin/env python3\nprint('hello')\n", 0o755)
    os.symlink("main.py", ctx / "src/entry.py")  # COPY keeps symlinks as symlinks
    (ctx / "src/links").mkdir()
    os.symlink("../main.py", ctx / "src/links/main.py")
    _tree(rng, ctx / "deps", spec.deps_files, ".txt", 3)
    _tree(rng, ctx / "docs", spec.docs_files, ".md", 2)
    _tree(rng, ctx / "config", spec.config_files, ".conf", 1)
    for i in range(spec.big_files_per_dir):
        _big(rng, ctx / "assets" / f"asset{i}.bin", spec.big_size)
        _big(rng, ctx / "data" / f"data{i}.bin", spec.big_size)
    _write(ctx / "Dockerfile", APP_DOCKERFILE.encode())
    par = root / "parallel"
    for i in range(spec.heavy_files):
        _big(rng, par / "heavy-a" / f"a{i}.bin", spec.heavy_size)
        _big(rng, par / "heavy-b" / f"b{i}.bin", spec.heavy_size)
    _write(par / "Dockerfile", PARALLEL_DOCKERFILE.encode())
    _write(ctx / "link.Dockerfile", LINK_DOCKERFILE.encode())
    _write(ctx / ".dockerignore", b"**/*.pyc\n.git\n")
    _write(
        ctx / "buildah.Dockerfile",
        buildah_variant(APP_DOCKERFILE, "localhost/base:latest").encode(),
    )
    return Scenario(
        root=root,
        base_context=base,
        context=ctx,
        dockerfile=ctx / "Dockerfile",
        parallel_context=par,
        parallel_dockerfile=par / "Dockerfile",
        edit_file=sorted(src)[len(src) // 2],
        bump_file=rootfs / "etc/os-release",
    )


def buildah_variant(dockerfile: str, base_ref: str) -> str:
    """The Dockerfile for buildah 1.28: ``FROM base`` names a real image, ``--link`` stripped."""
    text = re.sub(r"^(FROM\s+)base(\s|$)", rf"\g<1>{base_ref}\g<2>", dockerfile, flags=re.M)
    return re.sub(r"\s--link(=true)?\b", "", text)


def edit_small_file(s: Scenario, tag: str) -> None:
    """Change one small source file's content (the tag makes each edit new to every cache)."""
    data = s.edit_file.read_bytes()
    marker = b"\n# edit "
    head = data.split(marker, 1)[0]
    s.edit_file.write_bytes(head + marker + tag.encode() + b"\n")


def bump_base(s: Scenario, tag: str) -> None:
    """Change one file of the base image context (a new base release)."""
    s.bump_file.write_bytes(f'NAME="bench base"\nVERSION_ID="{tag}"\n'.encode())


def huge_context(root: Path, size: int = 1024 * MIB) -> Path:
    """A context with one ``size``-byte file and a Dockerfile that COPYs it.

    The content varies every MiB but compresses well, so the run measures lbuild's streaming
    (memory) rather than zlib's speed on random bytes.
    """
    root.mkdir(parents=True, exist_ok=True)
    _write(root / "Dockerfile", HUGE_DOCKERFILE.encode())
    rng = random.Random(7)
    with open(root / "huge.bin", "wb") as f:
        left = size
        while left:
            block = rng.randbytes(4096) * (MIB // 4096)
            n = min(left, MIB)
            f.write(block[:n])
            left -= n
    return root
