"""What the proxy writes to its log: one line per event, whatever a client sent.

User and database names, application_name, options and every other string a
client chooses reach log lines (directly, or inside an error's text).  A
newline in one of them would start a line of the client's making, a forged
log entry; terminal escapes could rewrite what an operator sees.  So every
logger of the proxy (``get_logger``) carries ``EscapingFilter``, which escapes
the arguments of each record before any handler formats it: ``\\n``, ``\\r``,
``\\t``, ``\\\\`` and ``\\xNN`` / ``\\uNNNN`` for every other character that
is not printable, as Python's repr() writes them.  The messages' own text
(the proxy's) is left alone, and a numeric argument stays a number.  Only a
traceback (``log.exception``) spans lines.

``JunkLog`` rate-limits the lines about connections that never logged in,
so that a flood of them costs a few lines.
"""

from __future__ import annotations

import collections
import collections.abc
import logging
import threading
import time

#: Seconds between two log lines about the same kind of junk (bad startup packets, failed logins).
JUNK_LOG_INTERVAL = 10.0

_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def printable(text: str) -> str:
    """``text`` with every character that is not printable, and the backslash, escaped (one line)."""
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for ch in text:
        if ch in _NAMED_ESCAPES:
            out.append(_NAMED_ESCAPES[ch])
        elif ch.isprintable():
            out.append(ch)
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000
                       else f"\\U{code:08x}")
    return "".join(out)


class _Escaped:
    """An argument formatted escaped, whether the message says %s or %r."""

    __slots__ = ("value",)

    def __init__(self, value) -> None:
        self.value = value

    def __str__(self) -> str:
        return printable(str(self.value))

    def __repr__(self) -> str:
        if isinstance(self.value, str):
            return repr(self.value)      # Python escapes every character that is not printable already
        return printable(repr(self.value))


def _escaped(value):
    if value is None or isinstance(value, (bool, int, float)):
        return value              # (%d and %f need the number itself)
    return _Escaped(value)


class EscapingFilter(logging.Filter):
    """Escapes every argument of a record (see the module docstring); drops nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if args:
            if isinstance(args, collections.abc.Mapping):
                record.args = {k: _escaped(v) for k, v in args.items()}
            else:
                record.args = tuple(_escaped(a) for a in args)
        elif not isinstance(record.msg, str) or not record.msg.isprintable():
            record.msg = printable(str(record.msg))      # a message built beforehand
        return True


_FILTER = EscapingFilter()


def get_logger(name: str) -> logging.Logger:
    """``logging.getLogger(name)`` with the escaping filter (every module of the proxy logs through one)."""
    logger = logging.getLogger(name)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    return logger


class JunkLog:
    """Log lines about hostile or broken connections, at most one per kind per ``interval``.

    The first of a kind is logged at once; the ones after it within the
    interval are counted, and the count is logged with the next line of that
    kind (or by ``flush``, which the janitor calls): a flood of junk
    connections costs a few lines, not one each.  Every line a connection
    causes before it has logged in goes through here.
    """

    def __init__(self, logger: logging.Logger, interval: float = JUNK_LOG_INTERVAL) -> None:
        self.logger = logger
        self.interval = interval
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._suppressed: collections.Counter = collections.Counter()
        self.total: collections.Counter = collections.Counter()

    def log(self, kind: str, msg: str, *args, level: int = logging.INFO) -> None:
        now = time.monotonic()
        with self._lock:
            self.total[kind] += 1
            last = self._last.get(kind)
            if last is not None and now - last < self.interval:
                self._suppressed[kind] += 1
                return
            self._last[kind] = now
            more = self._suppressed.pop(kind, 0)
        if more:
            msg += " (and %d more %s in the last %.0f s)"
            args += (more, kind, now - last)
        self.logger.log(level, msg, *args)

    def flush(self) -> None:
        """Log the counts of kinds that went quiet since their last line."""
        now = time.monotonic()
        with self._lock:
            due = [(kind, n, now - self._last[kind]) for kind, n in self._suppressed.items()
                   if now - self._last[kind] >= self.interval]
            for kind, _, _ in due:
                del self._suppressed[kind]
        for kind, n, age in due:
            self.logger.info("%d more %s in the last %.0f s", n, kind, age)
