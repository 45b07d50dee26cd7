"""A threaded HTTP reverse proxy on 127.0.0.1 in front of moto: counts S3 requests and injects faults.

Counts are kept per (method, path) as the server saw them (UploadPart is a PUT with ``?partNumber=``). Faults are
injected for a configurable fraction of matching requests: ``503 SlowDown`` (the throttling answer of real S3), a
connection reset before the request reaches moto (``reset``: the socket is closed unanswered, with an RST) or one
after moto has carried it out (``reset-after``: the answer is lost, as when a connection drops on the way back, so a
retry meets the request's own effect).
"""

from __future__ import annotations

import collections
import http.client
import random
import re
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>proxy</RequestId></Error>"
)


class S3Proxy:
    """``S3Proxy(upstream).start()``; point clients at ``.endpoint``; set ``.fault(...)``; ``.stop()`` at the end."""

    def __init__(self, upstream: str, seed: int = 0):
        self.upstream = urlsplit(upstream)
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []  # (method, path with query)
        self.injected: collections.Counter[str] = collections.Counter()
        self.rng = random.Random(seed)
        self.fault()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                action = proxy._decide(self.command, self.path)
                if action == "reset":
                    self._reset()
                    return
                if action == "503":
                    self.send_response(503, "Slow Down")
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOWDOWN)))
                    self.end_headers()
                    self.wfile.write(SLOWDOWN if self.command != "HEAD" else b"")
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    if action == "reset-after":
                        self._reset()
                        return
                    self.send_response(resp.status, resp.reason)
                    for k, v in resp.getheaders():
                        if k.lower() not in ("transfer-encoding", "connection", "content-length", "keep-alive"):
                            self.send_header(k, v)
                    # HEAD answers carry the object's length, not that of the (empty) body.
                    length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                    self.send_header("Content-Length", length or str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            def _reset(self):
                # RST instead of FIN (SO_LINGER 0), and no answer: the client sees "connection reset by peer". The
                # socket closes for real only with its last file object, so close the reader first, right now.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.rfile.close()
                self.connection.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="s3-proxy", daemon=True)

    def start(self) -> S3Proxy:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def fault(
        self,
        fraction: float = 0.0,
        *,
        methods: tuple[str, ...] = ("PUT", "GET"),
        path: str = "",
        kind: str = "503",
        limit: int | None = None,
    ) -> None:
        """Fail ``fraction`` of requests whose method is in ``methods`` and whose path matches the regex ``path``,
        with ``kind`` "503" (SlowDown), "reset" (before moto sees the request) or "reset-after" (after moto has
        carried it out); at most ``limit`` faults (None: unbounded)."""
        if kind not in ("503", "reset", "reset-after"):
            raise ValueError(f"unknown fault kind {kind!r}")
        with self.lock:
            self._fault = (fraction, tuple(methods), re.compile(path), kind, limit)

    def _decide(self, method: str, path: str) -> str | None:
        with self.lock:
            self.requests.append((method, path))
            fraction, methods, pattern, kind, limit = self._fault
            if fraction <= 0 or method not in methods or not pattern.search(path):
                return None
            if limit is not None and sum(self.injected.values()) >= limit:
                return None
            if self.rng.random() < fraction:
                self.injected[kind] += 1
                return kind
            return None

    def reset_counts(self) -> None:
        with self.lock:
            self.requests.clear()
            self.injected.clear()

    def count(self, method: str | None = None, path: str = "") -> int:
        """Requests seen (injected faults included) with this method whose path matches the regex ``path``."""
        pattern = re.compile(path)
        with self.lock:
            return sum(1 for m, p in self.requests if (method is None or m == method) and pattern.search(p))
