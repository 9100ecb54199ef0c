"""Secrets never printed, logged or written: one scrubber for every message that can carry a URI.

MLflow's own exceptions quote the tracking URI whole ("API request to http://user:pw@host/...
failed"), boto3 and Ray pass such messages on, and a traceback repeats them. `scrub(text)`
blanks, to `***`:

    the value of every environment variable named like a credential (AWS_SECRET_ACCESS_KEY,
        MLFLOW_TRACKING_PASSWORD, *_TOKEN, ...; 8 characters or longer, shorter ones are words)
    the user:password part of a URL in any scheme          http://***@host:5000/
    credential query parameters                            ?password=*** &token=*** X-Amz-Signature=***
    `Authorization: Basic|Bearer <value>` header values
    passwords of URLs in the environment or handed to `remember` (a URI read from a config),
        wherever they turn up on their own, e.g. in a library's repr of its auth tuple

`install()` puts it in front of everything a process prints or logs: each log record of every
logger is rendered once and scrubbed when it is made (a LogRecordFactory, so no handler - ours,
MLflow's, Ray's - sees the raw text, tracebacks included), warnings, and uncaught exceptions
(sys.excepthook and threading.excepthook print a scrubbed traceback without locals). The CLI also
scrubs its own stdout/stderr (`scrubbed_streams`) and turns an uncaught error into a scrubbed
traceback and a one-line message (`scrubbed_errors`). On Ray workers `install` runs from the
MLflow step hook (lineage.StepMetrics, the only worker code that talks to the tracking server);
as runtime_env={"worker_process_setup_hook": "lladav.secrets.install"} it covers a whole worker.

Logging, excepthooks and the standard streams are process-wide, so this module's state is too:
`install` is idempotent and `remember` only ever adds values.
Owns: what counts as a secret and the hooks above. Does not own: where URIs come from
(config.py, lladav/lineage/) or what gets logged.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import threading
import traceback
import warnings
from contextlib import contextmanager
from typing import Any, Iterator, TextIO
from urllib.parse import quote, unquote, urlsplit

MASK = "***"
_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|PRIVATE|ACCESS_KEY|API_KEY|_KEY$",
                          re.IGNORECASE)
_URL_USERINFO = re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^/@\s:]*:[^/@\s]+@", re.IGNORECASE)
_QUERY_SECRET = re.compile(
    r"([?&;](?:password|passwd|pwd|token|access_token|refresh_token|id_token|secret|client_secret|"
    r"api_key|apikey|x-amz-signature|x-amz-security-token|signature|sig)=)[^&\s#'\"]+",
    re.IGNORECASE)
_AUTH_HEADER = re.compile(r"(authorization['\"]?\s*[:=]\s*['\"]?(?:basic|bearer|token)\s+)[^\s'\",}]+",
                          re.IGNORECASE)
_MIN_LEN = 8
"""Shorter values ("true", moto's "testing") would blank ordinary words out of paths."""

_remembered: set[str] = set()
_factory_installed = False


def _url_passwords(text: str) -> set[str]:
    """Passwords in the URLs of `text`, raw and percent-decoded/encoded."""
    found: set[str] = set()
    for match in re.finditer(r"\b[a-z][a-z0-9+.-]*://[^\s'\"<>]+", text, re.IGNORECASE):
        try:
            password = urlsplit(match.group(0)).password
        except ValueError:
            continue
        if password:
            found |= {password, unquote(password), quote(unquote(password), safe="")}
    return found


def remember(value: str | None) -> None:
    """Treat the passwords of the URLs in `value` (a tracking URI from a config) as secrets in
    this process from now on, wherever they appear."""
    if value:
        _remembered.update(_url_passwords(value))


def secret_values() -> list[str]:
    """Every literal value scrub() blanks, longest first (so no prefix is replaced before it)."""
    values = set(_remembered)
    for name, value in os.environ.items():
        if _SECRET_NAME.search(name):
            values.add(value)
        if "://" in value:
            values |= _url_passwords(value)
    return sorted((v for v in values if len(v) >= _MIN_LEN), key=len, reverse=True)


def scrub(text: str) -> str:
    """`text` with credential-looking values blanked out (see the module docstring)."""
    for value in secret_values():
        text = text.replace(value, MASK)
    text = _URL_USERINFO.sub(rf"\1{MASK}@", text)
    text = _QUERY_SECRET.sub(rf"\1{MASK}", text)
    return _AUTH_HEADER.sub(rf"\1{MASK}", text)


def format_exception(exc: BaseException) -> str:
    """The traceback of `exc` (and its chain) as Python prints it, scrubbed; never locals."""
    return scrub("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))


def describe(exc: BaseException) -> str:
    """`Type: message` of `exc`, scrubbed, on one line."""
    text = " ".join(str(exc).split())
    return scrub(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


# ---- hooks -----------------------------------------------------------------------------------

def _scrubbing_factory(make: Any) -> Any:
    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string still must not leak its args
            message = f"{record.msg} {record.args!r}"
        record.msg, record.args = scrub(message), ()
        if record.exc_info and record.exc_info[1] is not None:
            # Rendered here, so no handler formats (or rich-renders, with locals) the raw one.
            record.exc_text = format_exception(record.exc_info[1]).rstrip("\n")
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)
        return record

    return factory


def _excepthook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
    sys.stderr.write(format_exception(exc.with_traceback(tb)))


def _thread_excepthook(args: Any) -> None:
    if args.exc_value is not None:
        name = getattr(args.thread, "name", "?")
        sys.stderr.write(f"Exception in thread {name}:\n{format_exception(args.exc_value)}")


def install() -> None:
    """Scrub every log record, warning and uncaught exception of this process (idempotent);
    also a Ray `worker_process_setup_hook`."""
    global _factory_installed
    if not _factory_installed:  # a flag: Ray wraps whatever factory it finds with its own
        logging.setLogRecordFactory(_scrubbing_factory(logging.getLogRecordFactory()))
        _factory_installed = True
    if not getattr(warnings.formatwarning, "lladav_scrubs", False):
        plain = warnings.formatwarning

        def formatwarning(*args: Any, **kwargs: Any) -> str:
            return scrub(plain(*args, **kwargs))

        formatwarning.lladav_scrubs = True  # type: ignore[attr-defined]
        warnings.formatwarning = formatwarning
    sys.excepthook = _excepthook
    threading.excepthook = _thread_excepthook


class _ScrubbedStream(io.TextIOBase):
    """A text stream that scrubs what it passes on, a line at a time (a secret is never split
    across two writes of a line), and the rest on flush (progress bars redraw without newlines)."""

    def __init__(self, target: TextIO) -> None:
        self.target = target
        self._pending = ""
        self._lock = threading.Lock()  # progress threads write too

    def write(self, text: str) -> int:
        with self._lock:
            self._pending += text
            head, newline, self._pending = self._pending.rpartition("\n")
            if newline:
                self.target.write(scrub(head + newline))
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._pending:
                self.target.write(scrub(self._pending))
                self._pending = ""
        self.target.flush()

    def isatty(self) -> bool:
        return self.target.isatty()

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.target.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.target, "encoding", "utf-8")

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return getattr(self.target, "errors", None)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.target, name)


@contextmanager
def scrubbed_streams() -> Iterator[None]:
    """sys.stdout and sys.stderr scrubbed for the block: what a library prints (MLflow's run
    URLs, rich output) passes the scrubber too."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _ScrubbedStream(sys.stdout), _ScrubbedStream(sys.stderr)
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        sys.stdout, sys.stderr = saved


@contextmanager
def scrubbed_errors(exit_code: int = 1) -> Iterator[None]:
    """An uncaught error becomes its scrubbed traceback (no locals) on stderr, then one line
    `error: Type: message`, and exit status `exit_code`; Ctrl-C exits 130 without a traceback."""
    try:
        yield
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        raise SystemExit(130) from None
    except Exception as e:  # noqa: BLE001 - the last stop before the terminal
        sys.stderr.write(format_exception(e))
        sys.stderr.write(f"error: {describe(e)}\n")
        sys.stderr.flush()
        raise SystemExit(exit_code) from None
