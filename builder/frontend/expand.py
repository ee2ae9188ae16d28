"""Docker's shell-word processing: quotes, escapes and ``$VAR`` expansion in Dockerfile words.

This mirrors the lexer BuildKit applies to instruction arguments
(``frontend/dockerfile/shell/lex.go``), not a POSIX shell:

- single quotes keep everything literal; double quotes allow ``$`` expansion, and inside them
  the escape character only escapes ``"``, ``$`` and itself (otherwise it stays literal);
- outside quotes the escape character makes the next character literal and is dropped;
- ``$V`` and ``${V}`` expand to the value of ``V`` or to ``""`` when unset;
- ``${V:-w}``, ``${V-w}``, ``${V:+w}``, ``${V+w}``, ``${V:?msg}``, ``${V?msg}``, ``${V#p}``,
  ``${V##p}``, ``${V%p}``, ``${V%%p}``, ``${V/p/r}`` and ``${V//p/r}`` behave as in BuildKit;
- the escape character is ``\\`` unless the Dockerfile says ``# escape=`` followed by a backtick.

Errors raise :class:`cache.errors.InvalidInput` without a location; callers that know the
Dockerfile and line re-raise with ``file``/``line`` (or pass them in here).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from cache.errors import InvalidInput

__all__ = ["expand_word", "expand_words", "heredoc_word_name", "split_words"]

_SPECIAL_PARAMS = frozenset("@*#?-$!0")


class _SyntaxError(Exception):
    """A word could not be processed; the message is BuildKit's wording."""


@dataclass(frozen=True)
class _Options:
    """How one lexer run treats quotes, escapes and unset variables."""

    escape: str = "\\"
    process_quotes: bool = True  # False: quotes are ordinary characters (heredoc bodies)
    raw_quotes: bool = False  # keep the quote characters in the output
    raw_escapes: bool = False  # keep escape characters in the output
    keep_unset: bool = False  # leave references to unset variables as written


class _Words:
    """Collects the words of a lexer run: unquoted whitespace separates words."""

    def __init__(self) -> None:
        self.words: list[str] = []
        self.word = ""
        self.in_word = False

    def add_char(self, ch: str) -> None:
        if ch.isspace():
            if self.in_word and self.word:
                self.words.append(self.word)
                self.word = ""
                self.in_word = False
        else:
            self.add_raw_char(ch)

    def add_raw_char(self, ch: str) -> None:
        self.word += ch
        self.in_word = True

    def add_string(self, text: str) -> None:
        for ch in text:
            self.add_char(ch)

    def add_raw_string(self, text: str) -> None:
        self.word += text
        self.in_word = True

    def result(self) -> list[str]:
        # An empty quoted string ("") marks a word but adds no characters: like BuildKit, it
        # produces no word.
        if self.word:
            self.words.append(self.word)
            self.word = ""
            self.in_word = False
        return self.words


class _Lexer:
    """One pass over one word; ``pos`` is the index of the next unread character."""

    def __init__(self, text: str, env: Mapping[str, str], opts: _Options) -> None:
        self.text = text
        self.env = env
        self.opts = opts
        self.pos = 0
        self.raw_escapes = opts.raw_escapes

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def next(self) -> str:
        ch = self.peek()
        if ch:
            self.pos += 1
        return ch

    def process(self, stop: str = "", raw_escapes: bool | None = None) -> tuple[str, list[str]]:
        """Process up to ``stop`` (consumed) or the end; return the text and its words."""
        saved = self.raw_escapes
        if raw_escapes is not None:
            self.raw_escapes = raw_escapes
        try:
            return self._process(stop)
        finally:
            self.raw_escapes = saved

    def _process(self, stop: str) -> tuple[str, list[str]]:
        out: list[str] = []
        words = _Words()
        esc = self.opts.escape
        while self.peek():
            ch = self.peek()
            if stop and ch == stop:
                self.next()
                return "".join(out), words.result()
            if ch == "$":
                value = self._dollar()
                out.append(value)
                words.add_string(value)  # expanded values are split on whitespace
            elif self.opts.process_quotes and ch in "'\"":
                value = self._single_quote() if ch == "'" else self._double_quote()
                out.append(value)
                words.add_raw_string(value)
            else:
                ch = self.next()
                if ch == esc:
                    if self.raw_escapes:
                        words.add_raw_char(ch)
                        out.append(ch)
                    ch = self.next()
                    if not ch:  # a trailing escape character is dropped
                        break
                    words.add_raw_char(ch)
                else:
                    words.add_char(ch)
                out.append(ch)
        if stop:
            raise _SyntaxError(f"unexpected end of statement while looking for matching {stop}")
        return "".join(out), words.result()

    def _single_quote(self) -> str:
        out: list[str] = []
        quote = self.next()
        if self.opts.raw_quotes:
            out.append(quote)
        while True:
            ch = self.next()
            if not ch:
                raise _SyntaxError(
                    "unexpected end of statement while looking for matching single-quote"
                )
            if ch == "'":
                if self.opts.raw_quotes:
                    out.append(ch)
                return "".join(out)
            out.append(ch)

    def _double_quote(self) -> str:
        out: list[str] = []
        quote = self.next()
        if self.opts.raw_quotes:
            out.append(quote)
        esc = self.opts.escape
        while True:
            ch = self.peek()
            if not ch:
                raise _SyntaxError(
                    "unexpected end of statement while looking for matching double-quote"
                )
            if ch == '"':
                self.next()
                if self.opts.raw_quotes:
                    out.append(ch)
                return "".join(out)
            if ch == "$":
                out.append(self._dollar())
                continue
            ch = self.next()
            if ch == esc:
                if self.raw_escapes:
                    out.append(ch)
                following = self.peek()
                if not following:
                    continue  # an escape at the very end is ignored
                if following in ('"', "$", esc):
                    ch = self.next()
            out.append(ch)

    def _name(self) -> str:
        """Read a variable name: digits, one special parameter, or letters/digits/_."""
        name: list[str] = []
        while self.peek():
            ch = self.peek()
            if not name and ch.isdecimal():
                while self.peek() and self.peek().isdecimal():
                    name.append(self.next())
                return "".join(name)
            if not name and ch in _SPECIAL_PARAMS:
                return self.next()
            if not (ch.isalpha() or ch.isdecimal() or ch == "_"):
                break
            name.append(self.next())
        return "".join(name)

    def _lookup(self, name: str) -> str | None:
        return self.env.get(name)

    def _dollar(self) -> str:
        self.next()  # the '$'
        if self.peek() != "{":
            name = self._name()
            if not name:
                return "$"
            value = self._lookup(name)
            if value is None:
                return "$" + name if self.opts.keep_unset else ""
            return value
        self.next()  # the '{'
        first = self.peek()
        if not first:
            raise _SyntaxError("syntax error: missing '}'")
        if first in "{}:":
            raise _SyntaxError("syntax error: bad substitution")
        name = self._name()
        ch = self.next()
        if not ch:
            raise _SyntaxError("syntax error: missing '}'")
        if ch == "}":
            value = self._lookup(name)
            if value is None:
                return "${" + name + "}" if self.opts.keep_unset else ""
            return value
        if ch == "/":
            return self._replace(name)
        modifier = ch
        null_is_unset = False
        if ch == ":":
            null_is_unset = True
            ch = self.next()
            if not ch:
                raise _SyntaxError("syntax error: missing '}'")
            modifier += ch
        if ch not in "+-?#%" and modifier[0] != ":":
            raise _SyntaxError(f"unsupported modifier ({modifier}) in substitution")
        word = self._word_until_brace(raw_escapes=ch in "#%")
        value = self._lookup(name)
        if value is None and self.opts.keep_unset:
            return "${" + name + modifier + word + "}"
        unset_or_null = value is None or (null_is_unset and value == "")
        if ch == "-":
            return word if unset_or_null else (value or "")
        if ch == "+":
            return "" if unset_or_null else word
        if ch == "?":
            if value is None:
                raise _SyntaxError(f"{name}: {word or 'is not allowed to be unset'}")
            if null_is_unset and value == "":
                raise _SyntaxError(f"{name}: {word or 'is not allowed to be empty'}")
            return value
        if ch in "#%":
            greedy = word.startswith(ch)
            if greedy:
                word = word[1:]
            return _trim(value or "", word, suffix=ch == "%", greedy=greedy)
        raise _SyntaxError(f"unsupported modifier ({modifier}) in substitution")

    def _word_until_brace(self, *, raw_escapes: bool) -> str:
        try:
            word, _ = self.process("}", raw_escapes=raw_escapes)
        except _SyntaxError:
            if not self.peek():
                raise _SyntaxError("syntax error: missing '}'") from None
            raise
        return word

    def _replace(self, name: str) -> str:
        replace_all = self.peek() == "/"
        if replace_all:
            self.next()
        try:
            pattern, _ = self.process("/", raw_escapes=True)
        except _SyntaxError:
            if not self.peek():
                raise _SyntaxError("syntax error: missing '/' in ${}") from None
            raise
        replacement = self._word_until_brace(raw_escapes=True)
        value = self._lookup(name)
        if value is None and self.opts.keep_unset:
            return "${" + name + "/" + pattern + "/" + replacement + "}"
        regex = _pattern_regex(pattern, greedy=True)
        return regex.sub(lambda _m: replacement, value or "", count=0 if replace_all else 1)


def _pattern_regex(pattern: str, *, greedy: bool) -> re.Pattern[str]:
    """Translate a shell pattern (``*``, ``?``, ``\\`` escapes; no brackets) to a regex."""
    out: list[str] = []
    i = 0
    star = ".*" if greedy else ".*?"
    while i < len(pattern):
        ch = pattern[i]
        i += 1
        if ch == "*":
            out.append(star)
        elif ch == "?":
            out.append(".")
        elif ch == "\\":
            following = pattern[i] if i < len(pattern) else ""
            if following in ("}", "/"):
                continue  # escaped only to get through the ${...} syntax
            if following not in ("*", "?", "\\"):
                raise _SyntaxError(f"invalid pattern ({pattern}) in substitution")
            out.append(re.escape(following))
            i += 1
        else:
            out.append(re.escape(ch))
    return re.compile("".join(out), re.DOTALL)


def _trim(value: str, pattern: str, *, suffix: bool, greedy: bool) -> str:
    """Remove the shortest (or longest, when greedy) prefix/suffix of value matching pattern."""
    regex = _pattern_regex(pattern, greedy=True)
    cuts = range(len(value) + 1)
    if suffix:
        order = cuts if greedy else reversed(cuts)
        for i in order:
            if regex.fullmatch(value, i):
                return value[:i]
    else:
        order = reversed(cuts) if greedy else cuts
        for i in order:
            if regex.fullmatch(value[:i]):
                return value[i:]
    return value


def _go_quote(text: str) -> str:
    """Quote text the way Go's %q does for ordinary strings (for error messages)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _run(
    text: str, env: Mapping[str, str], opts: _Options, file: str | None, line: int | None
) -> tuple[str, list[str]]:
    lexer = _Lexer(text, env, opts)
    try:
        return lexer.process()
    except _SyntaxError as err:
        raise InvalidInput(
            f"failed to process {_go_quote(text)}: {err}", file=file, line=line
        ) from None


def _check_escape(escape: str) -> None:
    if escape not in ("\\", "`"):
        raise ValueError(f"escape character must be a backslash or a backtick, not {escape!r}")


def expand_word(
    word: str,
    env: Mapping[str, str],
    *,
    escape: str = "\\",
    process_quotes: bool = True,
    file: str | None = None,
    line: int | None = None,
) -> str:
    """Return one Dockerfile word with quotes and escapes processed and variables expanded.

    ``process_quotes=False`` treats quote characters as ordinary text (BuildKit does that for
    the body of a ``COPY <<EOF`` heredoc).  Raises InvalidInput on a syntax error or a
    ``${V?msg}`` whose variable is unset.
    """
    _check_escape(escape)
    opts = _Options(escape=escape, process_quotes=process_quotes)
    return _run(word, env, opts, file, line)[0]


def expand_words(
    text: str,
    env: Mapping[str, str],
    escape: str = "\\",
    *,
    file: str | None = None,
    line: int | None = None,
) -> list[str]:
    """Expand text and split it into words as Docker does (EXPOSE ports, for example).

    Unquoted whitespace, including whitespace that comes from an unquoted variable's value,
    separates words; quoted text never splits.
    """
    _check_escape(escape)
    return _run(text, env, _Options(escape=escape), file, line)[1]


def split_words(text: str, *, escape: str = "\\") -> list[str]:
    """Split text into words keeping quotes, escapes and ``$`` references exactly as written.

    This is how BuildKit finds heredoc markers (``<<EOF``, ``<<-'EOF'``) in an instruction.
    """
    _check_escape(escape)
    opts = _Options(escape=escape, raw_quotes=True, raw_escapes=True, keep_unset=True)
    try:
        return _Lexer(text, {}, opts).process()[1]
    except _SyntaxError:
        # BuildKit ignores lexing errors here: an unbalanced quote just means no heredoc.
        return []


def heredoc_word_name(word: str) -> tuple[str, bool] | None:
    """Return (name, expand) for the word after ``<<``/``<<-``, or None if it is not one word.

    ``expand`` is False when any part of the name was quoted (``<<'EOF'``, ``<<"EOF"``):
    then the heredoc body is taken literally.
    """
    plain_opts = _Options(keep_unset=True)
    raw_opts = _Options(keep_unset=True, raw_quotes=True)
    try:
        plain = _Lexer(word, {}, plain_opts).process()[1]
        raw = _Lexer(word, {}, raw_opts).process()[1]
    except _SyntaxError:
        return None
    if len(plain) != 1 or len(raw) != 1:
        return None
    quotes_plain = plain[0].count("'") + plain[0].count('"')
    quotes_raw = raw[0].count("'") + raw[0].count('"')
    return plain[0], quotes_plain == quotes_raw
