"""A fault-injecting HTTP reverse proxy for S3 tests, standard library only.

`FaultProxy(upstream)` listens on 127.0.0.1 and forwards every request to `upstream` (the moto
server), except when it injects one of these faults instead:

    error500   HTTP 500 with S3's InternalError XML body; the request never reaches upstream
    slowdown   HTTP 503 with S3's SlowDown XML body; the request never reaches upstream
    drop       the connection is closed without a reply; the request never reaches upstream
    truncate   upstream's reply is sent with its full Content-Length, then the connection is
               closed after half the body (GET replies with a body of 2 bytes or more only)
    outage     during `outage(seconds)` every connection and request is closed unanswered

Which requests fail is deterministic, not a function of arrival order: the n-th time a given
(method, path, Range) arrives, sha256(seed, method, path, range, n) decides, with probability
`rate`, and only for n < `max_in_a_row`, so a retried request always gets through in the end.
`queue(kind, method, times)` forces faults on the next matching requests first (for unit tests).
`counts` says how many faults of each kind were injected and `log` lists every request.
"""

from __future__ import annotations

import hashlib
import http.client
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

KINDS = ("error500", "slowdown", "drop", "truncate")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
               "trailer", "transfer-encoding", "upgrade", "expect"}
_OWN = {"date", "server"}  # BaseHTTPRequestHandler.send_response writes its own
_ERRORS = {
    "error500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
}


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    range: str | None
    fault: str | None  # what was injected, None when forwarded untouched


class FaultProxy:
    def __init__(self, upstream: str, *, seed: int = 0, rate: float = 0.0,
                 max_in_a_row: int = 2) -> None:
        parsed = urlsplit(upstream)
        self.upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.seed, self.rate, self.max_in_a_row = seed, rate, max_in_a_row
        self.counts: Counter[str] = Counter()
        self.log: list[Request] = []
        self._seen: Counter[tuple] = Counter()
        self._queued: list[tuple[str, str | None]] = []
        self._outage_until = 0.0
        self._outage_trigger: tuple[float, Callable[[str, str], bool]] | None = None
        self._lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"proxy": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    # ---- control ------------------------------------------------------------------------------

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def queue(self, kind: str, method: str | None = None, times: int = 1) -> None:
        """Inject `kind` on the next `times` requests with `method` (any method if None)."""
        if kind not in KINDS:
            raise ValueError(f"unknown fault {kind!r}; one of {KINDS}")
        with self._lock:
            self._queued += [(kind, method)] * times

    def outage(self, seconds: float) -> None:
        """From now on, for `seconds`, close every connection and request unanswered."""
        with self._lock:
            self._outage_until = time.monotonic() + seconds

    def outage_when(self, seconds: float, trigger: Callable[[str, str], bool]) -> None:
        """Start `outage(seconds)` at the first request for which trigger(method, path) holds
        (that request is the first one refused): an outage at a chosen point of a job."""
        with self._lock:
            self._outage_trigger = (seconds, trigger)

    @property
    def outage_started(self) -> bool:
        return self._outage_until > 0

    def requests(self, method: str | None = None, contains: str = "") -> list[Request]:
        with self._lock:
            return [r for r in self.log
                    if (method is None or r.method == method) and contains in r.path]

    # ---- decisions (called by the handler threads) --------------------------------------------

    def _in_outage(self, method: str | None = None, path: str | None = None) -> bool:
        with self._lock:
            if self._outage_trigger and method and self._outage_trigger[1](method, path or ""):
                self._outage_until = time.monotonic() + self._outage_trigger[0]
                self._outage_trigger = None
            down = time.monotonic() < self._outage_until
            if down:
                self.counts["outage"] += 1
                if method:
                    self.log.append(Request(method, path or "", None, "outage"))
            return down

    def _fault_for(self, method: str, path: str, range_: str | None) -> str | None:
        with self._lock:
            for i, (kind, only) in enumerate(self._queued):
                if only is None or only == method:
                    del self._queued[i]
                    return kind
            signature = (method, path, range_)
            n = self._seen[signature]
            self._seen[signature] += 1
        if n >= self.max_in_a_row or self.rate <= 0:
            return None
        digest = hashlib.sha256(f"{self.seed}|{method}|{path}|{range_}|{n}".encode()).digest()
        if int.from_bytes(digest[:8], "big") / 2**64 >= self.rate:
            return None
        return KINDS[digest[8] % len(KINDS)]

    def _record(self, method: str, path: str, range_: str | None, fault: str | None) -> None:
        with self._lock:
            self.log.append(Request(method, path, range_, fault))
            if fault:
                self.counts[fault] += 1

    def _forward(self, method: str, path: str, headers: list[tuple[str, str]],
                 body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            conn.request(method, path, body=body or None, headers=dict(headers))
            reply = conn.getresponse()
            data = reply.read()
            return reply.status, reply.getheaders(), data
        finally:
            conn.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as botocore's connection pool expects
    proxy: FaultProxy

    def handle(self) -> None:
        if self.proxy._in_outage():
            return  # the server closes the connection unanswered
        super().handle()

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():  # trailers
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _serve(self) -> None:
        proxy, method, path = self.proxy, self.command, self.path
        body = self._body()
        if proxy._in_outage(method, path):
            self.close_connection = True
            return
        range_ = self.headers.get("Range")
        fault = proxy._fault_for(method, path, range_)
        if fault == "drop":
            proxy._record(method, path, range_, fault)
            self.close_connection = True
            return
        if fault in _ERRORS:
            status, code, message = _ERRORS[fault]
            xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                   f"<Message>{message}</Message><Resource>{path}</Resource>"
                   "<RequestId>faultproxy</RequestId></Error>").encode()
            proxy._record(method, path, range_, fault)
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(xml)))
            self.end_headers()
            self.wfile.write(xml if method != "HEAD" else b"")
            return
        headers = [(k, v) for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP]
        if body:
            headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
            headers.append(("Content-Length", str(len(body))))
        try:
            status, reply_headers, data = proxy._forward(method, path, headers, body)
        except OSError as e:
            proxy._record(method, path, range_, None)
            self.send_error(502, f"upstream: {e}")
            return
        truncate = fault == "truncate" and method == "GET" and len(data) >= 2
        proxy._record(method, path, range_, "truncate" if truncate else None)
        self.send_response(status)
        for k, v in reply_headers:
            if k.lower() in _HOP_BY_HOP | _OWN:
                continue
            if method == "HEAD" or k.lower() != "content-length":
                self.send_header(k, v)
        if method != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if method == "HEAD":
            return
        if truncate:
            self.wfile.write(data[:len(data) // 2])
            self.close_connection = True
            return
        self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _serve

