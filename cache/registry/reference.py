"""Image references exactly as Docker parses them (distribution's ``reference`` grammar).

``alpine`` is ``docker.io/library/alpine:latest``; a first component with a ``.`` or a ``:``,
or ``localhost``, or any capital letter is a registry host; ``index.docker.io`` is
``docker.io``; a digest wins over a tag (``repo:tag@sha256:...`` pulls the digest and keeps the
tag only as a label).  Invalid references raise ``InvalidInput`` with Docker's wording
("invalid reference format", "... repository name must be lowercase").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cache.errors import InvalidInput, Unsupported

DEFAULT_DOMAIN = "docker.io"
LEGACY_DEFAULT_DOMAIN = "index.docker.io"
OFFICIAL_REPO_PREFIX = "library/"
DEFAULT_TAG = "latest"
NAME_TOTAL_LENGTH_MAX = 255

# The grammar of github.com/distribution/reference (regexp.go), spelled out.
_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_NAME = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*"
_IPV6 = r"\[(?:[a-fA-F0-9:]+)\]"
_HOST = rf"(?:{_DOMAIN_NAME}|{_IPV6})"
_DOMAIN = rf"{_HOST}(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*[:][0-9A-Fa-f]{32,}"
_NAME = rf"(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
_REFERENCE = re.compile(rf"^({_NAME})(?::({_TAG}))?(?:@({_DIGEST}))?$")
_ANCHORED_NAME = re.compile(rf"^(?:({_DOMAIN})/)?({_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*)$")
_IDENTIFIER = re.compile(r"^[a-f0-9]{64}$")
_DIGEST_LENGTHS = {"sha256": 64, "sha384": 96, "sha512": 128}

INVALID = "invalid reference format"


@dataclass(frozen=True)
class Reference:
    """A normalized reference: ``domain/path[:tag][@digest]``."""

    domain: str
    path: str
    tag: str | None = None
    digest: str | None = None

    @property
    def repository(self) -> str:
        """``domain/path``: the name without tag or digest."""
        return f"{self.domain}/{self.path}"

    @property
    def registry_host(self) -> str:
        """Where the API lives: docker.io's is ``registry-1.docker.io``."""
        return "registry-1.docker.io" if self.domain == DEFAULT_DOMAIN else self.domain

    @property
    def reference(self) -> str:
        """What goes into ``/v2/<path>/manifests/<reference>``: the digest if any, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def with_tag(self, tag: str) -> Reference:
        return Reference(self.domain, self.path, tag, None)

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.domain, self.path, self.tag, digest)

    def __str__(self) -> str:
        text = self.repository
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text

    def familiar(self) -> str:
        """Docker's short spelling: ``alpine:3.20`` for ``docker.io/library/alpine:3.20``."""
        name = self.repository
        if self.domain == DEFAULT_DOMAIN:
            name = self.path.removeprefix(OFFICIAL_REPO_PREFIX)
        if self.tag is not None:
            name += f":{self.tag}"
        if self.digest is not None:
            name += f"@{self.digest}"
        return name


def _split_domain(name: str) -> tuple[str, str]:
    """distribution's splitDockerDomain: (domain, remainder) with docker.io's defaults."""
    i = name.find("/")
    first = name[:i] if i >= 0 else ""
    if i < 0 or (
        "." not in first and ":" not in first and first != "localhost" and first.lower() == first
    ):
        domain, rest = DEFAULT_DOMAIN, name
    else:
        domain, rest = first, name[i + 1 :]
    if domain == LEGACY_DEFAULT_DOMAIN:
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in rest:
        rest = OFFICIAL_REPO_PREFIX + rest
    return domain, rest


def _check_digest(digest: str, text: str) -> None:
    algo, _, hexpart = digest.partition(":")
    want = _DIGEST_LENGTHS.get(algo)
    if want is None:
        raise Unsupported(f"{text}: unsupported digest algorithm {algo!r}")
    if len(hexpart) != want:
        raise InvalidInput(f"{INVALID}: {text}: invalid checksum digest length")
    if hexpart != hexpart.lower():
        raise InvalidInput(f"{INVALID}: {text}: invalid checksum digest format")


def parse(text: str) -> Reference:
    """Parse ``text`` as ``docker pull`` would (ParseNormalizedNamed + default tag)."""
    if _IDENTIFIER.match(text):
        raise InvalidInput(
            f"invalid repository name ({text}), cannot specify 64-byte hexadecimal strings"
        )
    if not text:
        raise InvalidInput(f"{INVALID}: repository name must have at least one component")
    m = _REFERENCE.match(text)
    if m is None:
        # Docker's special case: the same text in lower case would parse.
        if _REFERENCE.match(text.lower()) is not None:
            raise InvalidInput(f"{INVALID}: repository name ({text}) must be lowercase")
        raise InvalidInput(f"{INVALID}: {text!r}")
    name, tag, digest = m.group(1), m.group(2), m.group(3)
    domain, path = _split_domain(name)
    if path.lower() != path:
        raise InvalidInput(f"{INVALID}: repository name ({path}) must be lowercase")
    if _ANCHORED_NAME.match(f"{domain}/{path}") is None:
        raise InvalidInput(f"{INVALID}: {text!r}")
    if len(f"{domain}/{path}") > NAME_TOTAL_LENGTH_MAX:
        raise InvalidInput(
            f"{INVALID}: repository name must not be more than {NAME_TOTAL_LENGTH_MAX} characters"
        )
    if digest is not None:
        _check_digest(digest, text)
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(domain, path, tag, digest)


def is_reference(text: str) -> bool:
    """Whether ``text`` parses as a reference (no exception)."""
    try:
        parse(text)
    except InvalidInput:
        return False
    return True
