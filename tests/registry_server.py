"""Loopback registries for tests: the real `docker-registry` (distribution 2.8) on 127.0.0.1.

Three set-ups, each a pytest fixture (one registry per xdist worker, repositories named per
test so tests never collide):
- ``registry``: anonymous, plain HTTP;
- ``tls_registry``: HTTPS with a CA made here (its ca.crt under a private certs.d root,
  ``LBUILD_CERTS_D``) and htpasswd Basic auth;
- ``token_registry``: Bearer tokens from a token server written here (JWTs signed RS256 by a
  key whose certificate is the registry's rootcertbundle).
Plus a fault-injecting reverse proxy (:class:`FaultProxy`) and image makers (OCI layouts
written by hand, then put into a registry with skopeo).
"""

from __future__ import annotations

import base64
import datetime
import gzip
import hashlib
import http.client
import http.server
import io
import json
import re
import socket
import subprocess
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REGISTRY_BIN = "/usr/bin/docker-registry"
USER, PASSWORD = "tester", "s3cret-pw"
REFRESH_TOKEN = "refresh-7f3a9c"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Registry:
    host: str  # 127.0.0.1:PORT
    root: Path
    proc: subprocess.Popen[bytes]
    tls: bool = False
    certs_d: Path | None = None
    ca: Path | None = None
    user: str | None = None
    password: str | None = None
    tokens: TokenServer | None = None
    log: Path | None = None

    def skopeo_flags(self, side: str) -> list[str]:
        """skopeo's flags to reach this registry as ``side`` ("src" or "dest")."""
        flags = [f"--{side}-tls-verify={'true' if self.tls else 'false'}"]
        if self.certs_d is not None:
            flags.append(f"--{side}-cert-dir={self.certs_d / self.host}")
        if self.user:
            flags.append(f"--{side}-creds={self.user}:{self.password}")
        return flags

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _wait_ready(host: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    name, port = host.rsplit(":", 1)
    for _ in range(400):
        if proc.poll() is not None:
            raise RuntimeError(f"docker-registry exited {proc.returncode}: {log.read_text()}")
        try:
            with socket.create_connection((name, int(port)), timeout=1):
                return
        except OSError:
            time.sleep(0.025)
    raise RuntimeError(f"docker-registry did not listen: {log.read_text()}")


def start_registry(root: Path, *, tls: tuple[Path, Path] | None = None,
                   htpasswd: Path | None = None, token: dict[str, str] | None = None) -> Registry:
    """Start docker-registry on a free loopback port with its data under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    host = f"127.0.0.1:{port}"
    cfg: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(root / "data")},
                    "delete": {"enabled": True}},
        "http": {"addr": host, "secret": "lbuild-test-secret"},
        "health": {"storagedriver": {"enabled": False}},
    }
    if tls is not None:
        cfg["http"]["tls"] = {"certificate": str(tls[0]), "key": str(tls[1])}
    if htpasswd is not None:
        cfg["auth"] = {"htpasswd": {"realm": "lbuild-test", "path": str(htpasswd)}}
    if token is not None:
        cfg["auth"] = {"token": token}
    conf = root / "config.yml"
    conf.write_text(json.dumps(cfg))  # YAML is a superset of JSON
    log = root / "registry.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([REGISTRY_BIN, "serve", str(conf)], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    _wait_ready(host, proc, log)
    return Registry(host, root, proc, tls=tls is not None, log=log)


# -- certificates --------------------------------------------------------------------------
def make_ca_and_cert(d: Path, host_ip: str = "127.0.0.1") -> tuple[Path, Path, Path]:
    """A CA and a server certificate for ``host_ip`` signed by it: (ca.crt, cert, key)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    d.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lbuild test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                       False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host_ip)]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(host_ip))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_path, cert_path, key_path = d / "ca.crt", d / "server.crt", d / "server.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    return ca_path, cert_path, key_path


# -- a token server ------------------------------------------------------------------------
def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def libtrust_key_id(der_spki: bytes) -> str:
    """docker/libtrust's key ID: base32 of sha256(SPKI)[:30], in groups of four."""
    b32 = base64.b32encode(hashlib.sha256(der_spki).digest()[:30]).decode()
    return ":".join(b32[i : i + 4] for i in range(0, len(b32), 4))


class TokenServer:
    """Issues registry JWTs for ``USER:PASSWORD`` (Basic on the token request)."""

    def __init__(self, d: Path, service: str = "lbuild-test-registry",
                 issuer: str = "lbuild-test-issuer", expires_in: int = 300) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        d.mkdir(parents=True, exist_ok=True)
        self.service, self.issuer, self.expires_in = service, issuer, expires_in
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        now = datetime.datetime.now(datetime.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lbuild token signer")])
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=30))
                .sign(self.key, hashes.SHA256()))
        self.bundle = d / "token-root.crt"
        self.bundle.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        spki = self.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        self.kid = libtrust_key_id(spki)
        self.requests: list[dict[str, Any]] = []
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def sign(self, claims: dict[str, Any]) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        header = {"typ": "JWT", "alg": "RS256", "kid": self.kid}
        signing_input = (_b64url(json.dumps(header).encode()) + "." +
                         _b64url(json.dumps(claims).encode()))
        sig = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + _b64url(sig)

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # OAuth2 refresh-token grant (identity tokens)
                from urllib.parse import parse_qs

                n = int(self.headers.get("Content-Length") or 0)
                form = parse_qs(self.rfile.read(n).decode())
                ok = (form.get("grant_type") == ["refresh_token"]
                      and form.get("refresh_token") == [REFRESH_TOKEN])
                scopes = form.get("scope", [""])[0].split(" ")
                self._answer(scopes, ok, form.get("service", [""])[0], "POST")

            def do_GET(self) -> None:
                from urllib.parse import parse_qs, urlparse

                q = parse_qs(urlparse(self.path).query)
                auth = self.headers.get("Authorization", "")
                good = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
                self._answer(q.get("scope", []), auth == good, q.get("service", [""])[0], "GET")

            def _answer(self, scopes: list[str], ok: bool, service: str, method: str) -> None:
                outer.requests.append({"scope": scopes, "auth": ok, "service": service,
                                       "method": method})
                if not ok:
                    body = b'{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}'
                    self.send_response(401)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                access = []
                for scope in scopes:
                    for one in scope.split(" "):
                        kind, _, rest = one.partition(":")
                        name, _, actions = rest.rpartition(":")
                        access.append({"type": kind, "name": name,
                                       "actions": actions.split(",")})
                now = int(time.time())
                token = outer.sign({
                    "iss": outer.issuer, "sub": USER, "aud": outer.service,
                    "exp": now + outer.expires_in, "nbf": now - 10, "iat": now,
                    "jti": uuid.uuid4().hex, "access": access})
                body = json.dumps({"token": token, "expires_in": outer.expires_in}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler

    def registry_config(self) -> dict[str, str]:
        return {"realm": self.realm, "service": self.service, "issuer": self.issuer,
                "rootcertbundle": str(self.bundle)}

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- a fault-injecting reverse proxy -------------------------------------------------------
@dataclass
class Fault:
    """``kind`` on requests whose "METHOD path" matches ``pattern``, ``times`` times."""

    pattern: str
    kind: str  # drop | 500 | 429 | truncate | flip | redirect | norange
    times: int = 1
    retry_after: str = "0"
    hits: int = 0


@dataclass
class FaultProxy:
    """A reverse proxy in front of ``upstream`` (host:port) that injects faults."""

    upstream: str
    faults: list[Fault] = field(default_factory=list)
    log: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    redirect_to: str | None = None
    server: http.server.ThreadingHTTPServer | None = None

    @property
    def host(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.server_address[1]}"

    def add(self, pattern: str, kind: str, times: int = 1, retry_after: str = "0") -> Fault:
        f = Fault(pattern, kind, times, retry_after)
        self.faults.append(f)
        return f

    def _fault_for(self, line: str) -> Fault | None:
        for f in self.faults:
            if f.hits < f.times and re.search(f.pattern, line):
                f.hits += 1
                return f
        return None

    def start(self) -> FaultProxy:
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                line = f"{self.command} {self.path}"
                outer.log.append((self.command, self.path, dict(self.headers.items())))
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    body = _read_chunked(self.rfile)
                fault = outer._fault_for(line)
                if fault is not None and fault.kind == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault is not None and fault.kind in ("500", "429"):
                    payload = b'{"errors":[{"code":"UNAVAILABLE","message":"injected"}]}'
                    self.send_response(int(fault.kind))
                    if fault.kind == "429":
                        self.send_header("Retry-After", fault.retry_after)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if fault is not None and fault.kind == "redirect" and outer.redirect_to:
                    self.send_response(307)
                    self.send_header("Location", f"http://{outer.redirect_to}{self.path}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "transfer-encoding", "content-length",
                                                "connection")}
                if fault is not None and fault.kind == "norange":
                    headers.pop("Range", None)
                headers["Host"] = self.headers.get("Host", outer.host)
                if body is not None:
                    headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(outer.upstream, timeout=60)
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                if fault is not None and fault.kind == "flip" and data:
                    i = len(data) // 2
                    data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                if fault is not None and fault.kind == "truncate" and len(data) > 1:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def _read_chunked(f: Any) -> bytes:
    out = io.BytesIO()
    while True:
        size = int(f.readline().strip().split(b";")[0], 16)
        if size == 0:
            f.readline()
            return out.getvalue()
        out.write(f.read(size))
        f.readline()


class HeaderRecorder:
    """A plain HTTP server on another port that records request headers and answers 404."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                outer.seen.append(dict(self.headers.items()))
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- images --------------------------------------------------------------------------------
def layer_tar(files: dict[str, bytes]) -> bytes:
    """An uncompressed layer tar with ``files`` (parents made), deterministic; files under
    bin/ and usr/bin/ are executable (0755), the others 0644."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        dirs: set[str] = set()
        for path in sorted(files):
            parts = path.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    info = tarfile.TarInfo(d)
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tf.addfile(info)
            info = tarfile.TarInfo(path)
            info.size = len(files[path])
            info.mode = 0o755 if path.startswith(("bin/", "usr/bin/")) else 0o644
            tf.addfile(info, io.BytesIO(files[path]))
    return buf.getvalue()


def _put_blob(layout: Path, data: bytes) -> dict[str, Any]:
    d = hashlib.sha256(data).hexdigest()
    p = layout / "blobs" / "sha256" / d
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return {"digest": f"sha256:{d}", "size": len(data)}


def add_image(layout: Path, layers: list[dict[str, bytes]], *, arch: str = "amd64",
              os_: str = "linux", variant: str = "", codec: str = "gzip",
              env: list[str] | None = None) -> dict[str, Any]:
    """Write an image (config, layers, manifest) into ``layout``; returns its descriptor."""
    diff_ids, descs = [], []
    for files in layers:
        raw = layer_tar(files)
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
        if codec == "zstd":
            import zstandard

            blob = zstandard.ZstdCompressor().compress(raw)
            media = "application/vnd.oci.image.layer.v1.tar+zstd"
        else:
            blob = gzip.compress(raw, mtime=0)
            media = "application/vnd.oci.image.layer.v1.tar+gzip"
        descs.append({"mediaType": media, **_put_blob(layout, blob)})
    config: dict[str, Any] = {
        "architecture": arch, "os": os_,
        "config": {"Env": env or ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": f"layer {i}"} for i in range(len(layers))],
    }
    if variant:
        config["variant"] = variant
    cdesc = {"mediaType": "application/vnd.oci.image.config.v1+json",
             **_put_blob(layout, json.dumps(config, sort_keys=True).encode())}
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": cdesc, "layers": descs}
    mdesc = {"mediaType": "application/vnd.oci.image.manifest.v1+json",
             **_put_blob(layout, json.dumps(manifest, sort_keys=True).encode())}
    platform = {"architecture": arch, "os": os_}
    if variant:
        platform["variant"] = variant
    mdesc["platform"] = platform
    return mdesc


def write_layout(layout: Path, top: dict[str, Any], tag: str = "latest") -> Path:
    """Make ``layout`` an OCI layout whose ``tag`` names descriptor ``top``."""
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    entry = {k: v for k, v in top.items() if k != "platform"}
    entry["annotations"] = {"org.opencontainers.image.ref.name": tag}
    (layout / "index.json").write_text(json.dumps(
        {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
         "manifests": [entry]}))
    return layout


def add_index(layout: Path, manifests: list[dict[str, Any]]) -> dict[str, Any]:
    """An image index over ``manifests`` (descriptors with platforms) in ``layout``."""
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": manifests}
    return {"mediaType": "application/vnd.oci.image.index.v1+json",
            **_put_blob(layout, json.dumps(index, sort_keys=True).encode())}


def skopeo_copy(src: str, dest: str, *flags: str) -> None:
    p = subprocess.run(["skopeo", "copy", "-q", *flags, src, dest], capture_output=True,
                       text=True, timeout=300)
    if p.returncode != 0:
        raise AssertionError(f"skopeo copy {src} {dest}: {p.stderr}")


def put_image(reg: Registry, layout: Path, repo: str, *flags: str, tag: str = "latest") -> str:
    """skopeo copy ``layout``'s ``tag`` to ``reg``/``repo``:``tag``; returns the reference."""
    ref = f"{reg.host}/{repo}:{tag}"
    skopeo_copy(f"oci:{layout}:latest", f"docker://{ref}", *reg.skopeo_flags("dest"), *flags)
    return ref


def unique_repo(prefix: str = "t") -> str:
    return f"{prefix}/{uuid.uuid4().hex[:12]}"


# -- fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="session", name="registry")
def registry_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """An anonymous plain-HTTP registry on loopback (one per xdist worker)."""
    reg = start_registry(tmp_path_factory.mktemp("registry"))
    yield reg
    reg.stop()


@pytest.fixture(scope="session", name="tls_registry")
def tls_registry_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """HTTPS with a test CA + htpasswd Basic auth (``USER``/``PASSWORD``)."""
    root = tmp_path_factory.mktemp("tlsregistry")
    ca, cert, key = make_ca_and_cert(root / "pki")
    htpasswd = root / "htpasswd"
    out = subprocess.run(["htpasswd", "-Bbn", USER, PASSWORD], check=True,
                         capture_output=True, text=True).stdout
    htpasswd.write_text(out.strip() + "\n")
    reg = start_registry(root, tls=(cert, key), htpasswd=htpasswd)
    certs_d = root / "certs.d"
    (certs_d / reg.host).mkdir(parents=True)
    (certs_d / reg.host / "ca.crt").write_bytes(ca.read_bytes())
    reg.certs_d, reg.ca, reg.user, reg.password = certs_d, ca, USER, PASSWORD
    yield reg
    reg.stop()


@pytest.fixture(scope="session", name="token_registry")
def token_registry_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """Plain HTTP, Bearer token auth from a :class:`TokenServer` (``USER``/``PASSWORD``)."""
    root = tmp_path_factory.mktemp("tokenregistry")
    tokens = TokenServer(root / "token")
    reg = start_registry(root, token=tokens.registry_config())
    reg.tokens, reg.user, reg.password = tokens, USER, PASSWORD
    yield reg
    reg.stop()
    tokens.stop()


def docker_config(d: Path, host: str, user: str = USER, password: str = PASSWORD) -> Path:
    """A $DOCKER_CONFIG directory whose config.json has ``auths`` for ``host``."""
    d.mkdir(parents=True, exist_ok=True)
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    (d / "config.json").write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    return d

