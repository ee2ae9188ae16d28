"""The daemon's request (builder.daemon_client): what the client encodes is what the daemon
decodes, byte for byte, and nothing else decodes."""

from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st

from builder.daemon_client import FORMAT, decode_request, encode_request

# what a process can get from the kernel: no NUL; names without '='; any bytes, which
# os.fsdecode turns into surrogate escapes
_text = st.binary(min_size=0, max_size=40).filter(lambda b: b"\0" not in b).map(os.fsdecode)
_name = st.binary(min_size=1, max_size=12).filter(
    lambda b: b"\0" not in b and b"=" not in b
).map(os.fsdecode)


@given(
    argv=st.lists(_text, max_size=6),
    cwd=_text.filter(bool),
    env=st.dictionaries(_name, _text, max_size=6),
    umask=st.integers(min_value=0, max_value=0o777),
    code=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=60),
)
def test_a_request_decodes_to_what_was_encoded(
    argv: list[str], cwd: str, env: dict[str, str], umask: int, code: str
) -> None:
    body = encode_request(argv, cwd, env, umask, code)
    assert decode_request(body) == {
        "argv": argv, "cwd": cwd, "env": env, "umask": umask, "code": code,
    }  # fmt: skip


def test_what_cannot_be_sent_or_decoded_is_refused() -> None:
    import pytest

    with pytest.raises(ValueError):
        encode_request(["a\0b"], "/", {}, 0o22, "c")
    with pytest.raises(ValueError):
        encode_request([], "/", {"K": "\ud800"}, 0o22, "c")  # no bytes give this back
    good = encode_request(["build", "."], "/w", {"A": "1"}, 0o22, "c")
    assert decode_request(good) is not None
    for bad in (
        b"",
        b"lbuild-request/1\0/w\x0018\0c\x000",  # another format
        good.replace(FORMAT, b"x"),
        FORMAT + b"\0/w\0eighteen\0c\x000",  # the umask not a number
        FORMAT + b"\0/w\x0018\0c\x009",  # more arguments than sent
        FORMAT + b"\0/w\x0018\0c\0-1",
        FORMAT + b"\0\x0018\0c\x000",  # no working directory
        FORMAT + b"\0/w\x0018\0c\x000\0NOVALUE",  # an environment entry without '='
        FORMAT + b"\0/w\x0018\0c\x000\0=x",
    ):
        assert decode_request(bad) is None, bad
