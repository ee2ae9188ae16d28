"""Unit tests for builder.frontend.expand: Docker's word processing (BuildKit shell/lex.go semantics)."""

from __future__ import annotations

import pytest

from builder.frontend.expand import expand_word, expand_words, heredoc_word_name, split_words
from cache.errors import InvalidInput

ENV = {
    "A": "a",
    "EMPTY": "",
    "SPACED": "x  y",
    "P": "/usr/local/bin/python3.tar.gz",
    "_under9": "u",
}


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("plain", "plain"),
        ("$A", "a"),
        ("${A}", "a"),
        ("pre${A}post", "preapost"),
        ("$Apost", ""),  # the name is Apost, which is unset
        ("$_under9!", "u!"),
        ("$UNSET", ""),
        ("${UNSET}", ""),
        ("$", "$"),
        ("a$", "a$"),
        ("$-x", "x"),  # special parameter "-" is unset
        ("$1x", "x"),  # positional parameter "1"
        ("cost: $ 5", "cost: $ 5"),
    ],
)
def test_variables(word: str, expected: str) -> None:
    assert expand_word(word, ENV) == expected


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("${A:-d}", "a"),
        ("${UNSET:-d}", "d"),
        ("${EMPTY:-d}", "d"),
        ("${A-d}", "a"),
        ("${UNSET-d}", "d"),
        ("${EMPTY-d}", ""),
        ("${A:+alt}", "alt"),
        ("${EMPTY:+alt}", ""),
        ("${UNSET:+alt}", ""),
        ("${A+alt}", "alt"),
        ("${EMPTY+alt}", "alt"),
        ("${UNSET+alt}", ""),
        ("${A:?msg}", "a"),
        ("${EMPTY?msg}", ""),
        ("${UNSET:-$A}", "a"),  # the word is expanded too
        ("${UNSET:-${UNSET2:-deep}}", "deep"),
        ('${UNSET:-"two words"}', "two words"),
        ("${P#*/}", "usr/local/bin/python3.tar.gz"),
        ("${P##*/}", "python3.tar.gz"),
        ("${P%.*}", "/usr/local/bin/python3.tar"),
        ("${P%%.*}", "/usr/local/bin/python3"),
        ("${P#nomatch}", "/usr/local/bin/python3.tar.gz"),
        ("${P/o/0}", "/usr/l0cal/bin/python3.tar.gz"),
        ("${P//o/0}", "/usr/l0cal/bin/pyth0n3.tar.gz"),
        ("${A/?/b}", "b"),
    ],
)
def test_substitution_forms(word: str, expected: str) -> None:
    assert expand_word(word, ENV) == expected


@pytest.mark.parametrize(
    ("word", "message"),
    [
        ("${UNSET:?}", "UNSET: is not allowed to be unset"),
        ("${UNSET?custom message}", "UNSET: custom message"),
        ("${EMPTY:?}", "EMPTY: is not allowed to be empty"),
        ("${EMPTY:?must be set}", "EMPTY: must be set"),
        ("${", "syntax error: missing '}'"),
        ("${A", "syntax error: missing '}'"),
        ("${A:-x", "syntax error: missing '}'"),
        ("${}", "syntax error: bad substitution"),
        ("${:-x}", "syntax error: bad substitution"),
        ("${A=x}", "unsupported modifier (=) in substitution"),
        ("${A:x}", "unsupported modifier (:x) in substitution"),
        ('"open', "unexpected end of statement while looking for matching double-quote"),
        ("'open", "unexpected end of statement while looking for matching single-quote"),
    ],
)
def test_errors(word: str, message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        expand_word(word, ENV)
    assert info.value.message.endswith(": " + message)
    assert info.value.message.startswith("failed to process ")
    assert info.value.exit_code == 2


def test_error_location_is_passed_through() -> None:
    with pytest.raises(InvalidInput) as info:
        expand_word("${X:?}", {}, file="Dockerfile", line=7)
    assert (
        str(info.value) == 'Dockerfile:7: failed to process "${X:?}": X: is not allowed to be unset'
    )


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("'$A'", "$A"),  # single quotes: literal
        ("'a\\b'", "a\\b"),  # no escapes inside single quotes
        ('"$A b"', "a b"),  # double quotes: expansion, spaces kept
        ('"a\\"b"', 'a"b'),
        ('"a\\$A"', "a$A"),
        ('"a\\\\b"', "a\\b"),
        ('"a\\nb"', "a\\nb"),  # other escapes stay literal inside double quotes
        ("\\$A", "$A"),
        ("a\\ b", "a b"),
        ("a\\nb", "anb"),  # outside quotes the escape is dropped
        ("trailing\\", "trailing"),
        ("\"mixed\"'quotes'$A", "mixedquotesa"),
        ('""', ""),
        ("it'\"'s", 'it"s'),
    ],
)
def test_quotes_and_escapes(word: str, expected: str) -> None:
    assert expand_word(word, ENV) == expected


def test_backtick_escape_directive() -> None:
    assert expand_word("C:\\path\\$A", ENV, escape="`") == "C:\\path\\a"
    assert expand_word("`$A", ENV, escape="`") == "$A"
    assert expand_word('"say `"hi`""', ENV, escape="`") == 'say "hi"'
    assert expand_word("a``b", ENV, escape="`") == "a`b"
    with pytest.raises(ValueError):
        expand_word("x", ENV, escape="x")


def test_without_quote_processing() -> None:
    # BuildKit's treatment of COPY heredoc bodies: quotes are content, escapes still work.
    assert expand_word("\"$A\" '$A' \\$A", ENV, process_quotes=False) == "\"a\" 'a' $A"


def test_expand_words_splitting() -> None:
    assert expand_words("$SPACED", ENV) == ["x", "y"]
    assert expand_words('"$SPACED"', ENV) == ["x  y"]
    assert expand_words("a\\ b c", ENV) == ["a b", "c"]
    assert expand_words('  80  "" 443/tcp ', ENV) == ["80", "443/tcp"]
    assert expand_words("pre$SPACED", ENV) == ["prex", "y"]
    assert expand_words("", ENV) == []


def test_split_words_keeps_everything_raw() -> None:
    assert split_words("cat <<\"EOF\" 3<<-'E2' $X a\\ b") == [
        "cat",
        '<<"EOF"',
        "3<<-'E2'",
        "$X",
        "a\\ b",
    ]
    assert split_words('unbalanced "quote') == []


def test_heredoc_word_name() -> None:
    assert heredoc_word_name("EOF") == ("EOF", True)
    assert heredoc_word_name('"EOF"') == ("EOF", False)
    assert heredoc_word_name("'EOF'") == ("EOF", False)
    assert heredoc_word_name("E'O'F") == ("EOF", False)
    assert heredoc_word_name("two words") is None
