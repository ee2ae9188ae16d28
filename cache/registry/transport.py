"""HTTP to one registry: scheme and TLS, authentication, retries.  Built on httpx.

- **Scheme.** HTTPS always, with the system trust store plus ``/etc/docker/certs.d/HOST/``
  (``*.crt`` CAs, ``*.cert``/``*.key`` client pairs; the root is ``$LBUILD_CERTS_D`` when set).
  Plain HTTP only for loopback hosts (localhost, 127.0.0.0/8, ::1) and the hosts listed in
  ``$LBUILD_INSECURE_REGISTRIES`` (comma separated), and only when HTTPS cannot be spoken
  there at all: a certificate that does not verify is an error, never a reason to downgrade.
- **Auth.** A request goes out anonymously until the registry answers 401 with a
  ``WWW-Authenticate`` challenge; ``Basic`` sends the configured credentials, ``Bearer``
  fetches a token from the realm for the request's scopes (``repository:NAME:pull[,push]``),
  cached per scope set until it expires.  httpx drops ``Authorization`` on a cross-origin
  redirect (a blob GET sent on to object storage) and we never re-add it there.
- **Retries.** Connection errors, 5xx and 429 are retried (``retries`` times, exponential
  backoff, ``Retry-After`` honoured up to a cap) for requests that can be replayed.
- Credentials never appear in an error message or a log line.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

from cache.registry.auth import Credentials, credentials_for
from cache.registry.errors import RegistryError
from cache.registry.httplib import httpx

CERTS_D = "/etc/docker/certs.d"
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "POST"})
"""Methods replayed on a failure.  POST only ever starts an upload session here (a new
session per attempt is harmless); PATCH appends to a session and is never replayed."""
MAX_RETRY_AFTER_S = 30.0
BACKOFF_S = 0.2
"""The first retry's wait; each next one doubles it (0.2, 0.4, 0.8, 1.6 s)."""
USER_AGENT = "lbuild/0.1"
Body = bytes | Callable[[], Iterable[bytes]] | None
_SCHEMES: dict[str, str] = {}
"""host -> the scheme it answered on, for hosts that may use plain HTTP (this process)."""
_PROBES: dict[str, threading.Lock] = {}
_PROBES_LOCK = threading.Lock()


def _probe_lock(host: str) -> threading.Lock:
    """The lock under which ``host``'s scheme is probed: the build's threads (the cache's
    records, the base image) talking to one registry probe it once, the others wait."""
    with _PROBES_LOCK:
        return _PROBES.setdefault(host, threading.Lock())


def is_loopback(host: str) -> bool:
    """Whether ``host[:port]`` names this machine (Docker's implicit insecure registries)."""
    name = _hostname(host)
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _hostname(host: str) -> str:
    if host.startswith("["):
        return host[1 : host.index("]")]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def insecure_allowed(host: str) -> bool:
    """Whether plain HTTP may be used for ``host`` (loopback or LBUILD_INSECURE_REGISTRIES)."""
    if is_loopback(host):
        return True
    listed = {h.strip() for h in os.environ.get("LBUILD_INSECURE_REGISTRIES", "").split(",")}
    return host in listed or _hostname(host) in listed


class _Trust(ssl.SSLContext):
    """A client context (hostname checked, certificate required) that loads the system
    trust store and certs.d only before its first handshake: loading the system bundle
    costs about 0.15 s, which a pull from a plain-HTTP loopback registry never needs."""

    _loaded = False
    _certs_dir: Path | None = None
    _load_lock = threading.Lock()

    def _load(self) -> None:
        with self._load_lock:
            if self._loaded:
                return
            self.load_default_certs(ssl.Purpose.SERVER_AUTH)
            d = self._certs_dir
            if d is not None and d.is_dir():
                for ca in sorted(d.glob("*.crt")):
                    self.load_verify_locations(cafile=str(ca))
                for cert in sorted(d.glob("*.cert")):
                    key = cert.with_suffix(".key")
                    if not key.is_file():
                        raise RegistryError(f"{cert}: client certificate without {key.name}")
                    self.load_cert_chain(str(cert), str(key))
            self._loaded = True

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        self._load()
        return super().wrap_socket(*args, **kwargs)

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        self._load()
        return super().wrap_bio(*args, **kwargs)


def speaks_tls(host: str, timeout: float = 15.0) -> bool | None:
    """Whether ``host[:port]`` answers a TLS handshake as a TLS server (None: no connection).

    For hosts that may use plain HTTP, whose scheme is not known yet: the handshake runs with
    a context that trusts nothing, so it never completes and nothing is sent over it.  A TLS
    server fails it on its certificate; anything else (a plain HTTP server answers the
    ClientHello with a 400, or closes) is not TLS.  This spares loading the system trust
    store (``_Trust``) for a registry that does not speak TLS at all."""
    import socket

    name = _hostname(host)
    try:
        sock = socket.create_connection((name, _port(host)), timeout=timeout)
    except OSError:
        return None
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # hostname checked, certificate required
    try:
        with probe.wrap_socket(sock, server_hostname=name):
            return True  # unreachable with an empty trust store; a TLS server if it happens
    except ssl.SSLCertVerificationError:
        return True
    except OSError:  # ssl.SSLError included: not TLS
        return False
    finally:
        sock.close()


def _port(host: str) -> int:
    """The port ``host[:port]`` names (443 when none)."""
    if host.startswith("["):
        rest = host[host.index("]") + 1 :]
        return int(rest[1:]) if rest.startswith(":") else 443
    return int(host.rsplit(":", 1)[1]) if host.count(":") == 1 else 443


def _proxied() -> bool:
    """Whether httpx may send requests through a proxy (then only a request tells)."""
    return any(k.lower() in ("http_proxy", "https_proxy", "all_proxy") for k in os.environ)


def ssl_context(host: str) -> ssl.SSLContext:
    """System trust plus the CAs and client certificates of ``certs.d/HOST`` (loaded before
    the first handshake)."""
    ctx = _Trust(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED by default
    ctx._certs_dir = Path(os.environ.get("LBUILD_CERTS_D") or CERTS_D) / host
    return ctx


@dataclass(frozen=True)
class Challenge:
    scheme: str  # "basic" or "bearer"
    params: Mapping[str, str]


_PARAM = re.compile(r'([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))')


def parse_challenge(header: str) -> Challenge | None:
    """``Bearer realm="…",service="…",scope="…"`` -> Challenge (None if unusable)."""
    scheme, _, rest = header.strip().partition(" ")
    if scheme.lower() not in ("basic", "bearer"):
        return None
    params = {m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3))
              for m in _PARAM.finditer(rest)}
    return Challenge(scheme.lower(), params)


def error_text(resp: httpx.Response) -> tuple[str, str]:
    """(code, "code: message") from a distribution error body, or the HTTP status text."""
    try:
        errors = resp.json().get("errors") or []
        first = errors[0]
        code = str(first.get("code", ""))
        message = str(first.get("message", "")) or code.lower()
        return code, f"{code.lower().replace('_', ' ')}: {message}" if code else message
    except Exception:
        return "", f"{resp.status_code} {resp.reason_phrase}".strip()


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    if not value:
        return None
    try:
        return min(MAX_RETRY_AFTER_S, max(0.0, float(value)))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return min(MAX_RETRY_AFTER_S, max(0.0, when - time.time()))


def _cert_failure(e: BaseException) -> ssl.SSLCertVerificationError | None:
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _unknown_host(e: BaseException) -> bool:
    """A name that DNS says does not exist (EAI_NONAME): asking again will not help."""
    import socket

    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, socket.gaierror) and seen.errno == socket.EAI_NONAME:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class Transport:
    """Requests to one registry ``host[:port]``, authenticated and retried."""

    def __init__(
        self,
        host: str,
        *,
        retries: int = 4,
        backoff_s: float | None = None,
        credentials: Credentials | None = None,
        lookup_credentials: bool = True,
    ) -> None:
        self.host = host
        self.retries = retries
        self.backoff_s = BACKOFF_S if backoff_s is None else backoff_s
        self._creds = credentials
        self._creds_looked_up = credentials is not None or not lookup_credentials
        self._scheme: str | None = (
            _SCHEMES.get(host) if insecure_allowed(host) else "https"
        )
        self._lock = threading.Lock()
        self._fetch_lock = threading.Lock()
        self._challenge: Challenge | None = None
        self._tokens: dict[tuple[str, ...], tuple[str, float]] = {}
        self._client = httpx.Client(
            verify=ssl_context(host),
            timeout=httpx.Timeout(60.0, connect=15.0),
            follow_redirects=True,
            headers={"User-Agent": USER_AGENT},
            limits=httpx.Limits(max_connections=16, max_keepalive_connections=16),
        )
        self.requests: list[tuple[str, str]] = []
        """(method, path) of every request sent (for tests and benchmarks)."""

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- URLs -------------------------------------------------------------------------------
    def url(self, path: str) -> str:
        """An absolute URL for ``path`` (``/v2/…``); absolute URLs pass through."""
        if path.startswith(("http://", "https://")):
            return path
        return f"{self._scheme or 'https'}://{self.host}{path}"

    # -- credentials ------------------------------------------------------------------------
    def _credentials(self) -> Credentials | None:
        if not self._creds_looked_up:
            self._creds = credentials_for(self.host)
            self._creds_looked_up = True
        return self._creds

    def _auth_header(self, scopes: tuple[str, ...]) -> str | None:
        ch = self._challenge
        if ch is None:
            return None
        if ch.scheme == "basic":
            creds = self._credentials()
            if creds is None or not creds.username:
                return None
            raw = f"{creds.username}:{creds.password}".encode()
            return "Basic " + base64.b64encode(raw).decode()
        return "Bearer " + self._token(ch, scopes)

    def _token(self, ch: Challenge, scopes: tuple[str, ...]) -> str:
        # One fetch at a time: parallel blob requests wait for the first one's token.
        with self._fetch_lock:
            with self._lock:
                cached = self._tokens.get(scopes)
                if cached is not None and cached[1] > time.monotonic():
                    return cached[0]
            return self._fetch_token(ch, scopes)

    def _fetch_token(self, ch: Challenge, scopes: tuple[str, ...]) -> str:
        realm = ch.params.get("realm")
        if not realm:
            raise RegistryError(f"{self.host}: the registry's Bearer challenge names no realm")
        creds = self._credentials()
        params: list[tuple[str, str | int | float | bool | None]] = []
        if ch.params.get("service"):
            params.append(("service", ch.params["service"]))
        params.extend(("scope", s) for s in scopes)
        if creds is not None and creds.identity_token:
            form = {k: str(v) for k, v in params}
            form.update(grant_type="refresh_token", refresh_token=creds.identity_token,
                        client_id="lbuild")
            form["scope"] = " ".join(scopes)
            resp = self._client.post(realm, data=form)
        else:
            auth = (creds.username, creds.password) if creds and creds.username else None
            resp = self._client.get(realm, params=params, auth=auth)
        if resp.status_code != 200:
            _, text = error_text(resp)
            raise RegistryError(f"{self.host}: unauthorized: token server said {text}",
                                status=resp.status_code, code="UNAUTHORIZED")
        try:
            body: dict[str, Any] = resp.json()
        except ValueError as e:
            raise RegistryError(f"{self.host}: the token server answered no JSON") from e
        token = body.get("token") or body.get("access_token")
        if not isinstance(token, str) or not token:
            raise RegistryError(f"{self.host}: the token server answered no token")
        expires_in = float(body.get("expires_in") or 60)
        with self._lock:
            self._tokens[scopes] = (token, time.monotonic() + max(1.0, expires_in - 5.0))
        return token

    # -- requests ---------------------------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        *,
        scopes: tuple[str, ...],
        headers: Mapping[str, str] | None = None,
        content: Body = None,
        stream: bool = False,
        follow_redirects: bool = True,
    ) -> httpx.Response:
        """Send one request: 401 -> authenticate once; errors worth it -> retry with backoff.

        Returns the response whatever its status (the caller judges it); with ``stream`` the
        caller reads and closes it.  Raises RegistryError when the registry cannot be reached.
        """
        if self._scheme is None and not path.startswith(("http://", "https://")):
            self._choose_scheme()
        attempt = 0
        authed_again = False
        replayable = method in IDEMPOTENT
        while True:
            hdrs = dict(headers or {})
            auth = self._auth_header(scopes)
            if auth is not None:
                hdrs["Authorization"] = auth
            body = content() if callable(content) else content
            req = self._client.build_request(method, self.url(path), headers=hdrs, content=body)
            try:
                resp = self._client.send(req, stream=True, follow_redirects=follow_redirects)
            except httpx.TransportError as e:
                bad_cert = _cert_failure(e)
                if bad_cert is not None:
                    raise RegistryError(
                        f"{self.host}: TLS certificate not trusted: {bad_cert.verify_message}",
                        hint=f"put the registry's CA in {CERTS_D}/{self.host}/ca.crt",
                    ) from None
                if self._scheme is None and not path.startswith(("http://", "https://")):
                    # A loopback/insecure host that does not speak TLS at all.
                    self._scheme = _SCHEMES[self.host] = "http"
                    continue
                if replayable and attempt < self.retries and not _unknown_host(e):
                    self._sleep(attempt, None)
                    attempt += 1
                    continue
                raise RegistryError(
                    f"{self.host}: {method} {req.url.path}: {type(e).__name__}: {e}"
                ) from None
            self.requests.append((method, req.url.path))
            if self._scheme is None:
                self._scheme = _SCHEMES[self.host] = req.url.scheme
            if resp.status_code == 401 and not authed_again:
                ch = parse_challenge(resp.headers.get("www-authenticate", ""))
                if ch is not None and (ch.scheme == "bearer" or self._credentials()):
                    resp.close()
                    self._challenge = ch
                    with self._lock:  # drop the token only if it is the one refused
                        cached = self._tokens.get(scopes)
                        if auth is not None and cached and auth == f"Bearer {cached[0]}":
                            del self._tokens[scopes]
                    authed_again = True
                    continue
            if resp.status_code in RETRY_STATUSES and replayable and attempt < self.retries:
                wait = _retry_after(resp)
                resp.close()
                self._sleep(attempt, wait)
                attempt += 1
                continue
            if not stream:
                resp.read()
                resp.close()
            return resp

    def _choose_scheme(self) -> None:
        """A host that may use plain HTTP: HTTPS if it speaks TLS, else HTTP (``speaks_tls``);
        left open (the first request tries HTTPS, then HTTP) when that cannot be told."""
        if _proxied():
            return
        with self._lock, _probe_lock(self.host):  # one probe per host and process
            if self._scheme is not None:
                return
            known = _SCHEMES.get(self.host)
            if known is not None:  # another transport (a thread of this build) just probed
                self._scheme = known
                return
            tls = speaks_tls(self.host)
            if tls is not None:
                self._scheme = _SCHEMES[self.host] = "https" if tls else "http"

    def _sleep(self, attempt: int, retry_after: float | None) -> None:
        delay = retry_after if retry_after is not None else self.backoff_s * (2**attempt)
        time.sleep(min(delay, MAX_RETRY_AFTER_S))
