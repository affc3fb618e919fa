"""A fault-injecting HTTP proxy on 127.0.0.1 in front of the loopback S3 (moto's server).

For a seeded share of requests it answers 500 InternalError, 503 SlowDown or 503 ServiceUnavailable in S3's XML
shape, or resets the connection without answering; every other request is forwarded unchanged. Used by the
reliability suite to show that the data stage and checkpointing complete under object-store faults.

`fail_first` makes chosen requests fail for sure, so a test does not depend on where random faults fall: it maps
(method, path substring) to a fault, and the first request with that method to each distinct path containing the
substring gets it (its retry goes through).

It can also play a bucket policy that refuses access: every request for a bucket in `deny_buckets`, or for an object
under a `bucket/key-prefix` in `deny_prefixes` (listing the bucket stays allowed), is answered 403 AccessDenied as S3
answers it. `requests` records (method, bucket/key, fault or None) of every request it saw, so a test can tell which
traffic went through the proxy and which of it got a fault. Clients address it path-style
(`http://127.0.0.1:<port>/<bucket>/<key>`), as botocore and pyarrow do for an IP endpoint.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
from collections.abc import Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

FAULTS = ("internal_error", "slow_down", "service_unavailable", "reset")
_ANSWERS = {"access_denied": ("AccessDenied", 403, "Access Denied"),  # (S3 error code, HTTP status, message)
            "internal_error": ("InternalError", 500, "We encountered an internal error."),
            "slow_down": ("SlowDown", 503, "Please reduce your request rate."),
            "service_unavailable": ("ServiceUnavailable", 503, "Service unavailable.")}
_XML = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
        '<RequestId>faulty-s3</RequestId></Error>')


class FaultyS3:
    """Start with `FaultyS3(upstream_port, fault_rate).start()`; `endpoint` is the URL clients should use."""

    def __init__(self, upstream_port: int, fault_rate: float = 0.1, seed: int = 0, *, faults: Iterable[str] = FAULTS,
                 fail_first: Mapping[tuple[str, str], str] | None = None, deny_buckets: Iterable[str] = (),
                 deny_prefixes: Iterable[str] = ()):
        self.upstream_port = upstream_port
        self.fault_rate = fault_rate
        self.rng = random.Random(seed)
        self.faults = tuple(faults)  # the kinds random faults are drawn from
        self.lock = threading.Lock()
        self.fail_first = dict(fail_first or {})
        self.failed_once: set[tuple[str, str]] = set()
        self.deny_buckets = set(deny_buckets)
        self.deny_prefixes = tuple(deny_prefixes)
        self.counts = {"requests": 0, "access_denied": 0, **{f: 0 for f in FAULTS}}
        self.requests: list[tuple[str, str, str | None]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _read_body(self) -> bytes:
                if "chunked" not in (self.headers.get("Transfer-Encoding") or "").lower():
                    length = int(self.headers.get("Content-Length") or 0)
                    return self.rfile.read(length) if length else b""
                # HTTP chunking (pyarrow's uploads): undo it and forward the payload with a Content-Length. The
                # payload itself may be aws-chunked (Content-Encoding), which the upstream decodes as it would.
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers, then a blank line
                            pass
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()  # the CRLF after each chunk

            def _handle(self):
                body = self._read_body()
                fault = proxy.pick(self.command, unquote(urlsplit(self.path).path).lstrip("/"))
                if fault == "reset":
                    # RST instead of FIN: the client sees "connection reset by peer".
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    self.close_connection = True
                    return
                if fault:
                    code, status, message = _ANSWERS[fault]
                    payload = _XML.format(code=code, message=message).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                # The body was read whole (and de-chunked): http.client sends it with its own Content-Length.
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("connection", "transfer-encoding", "expect", "content-length")}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(k, v)
                # A HEAD answer has no body but the object's Content-Length (clients take the size from it).
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def pick(self, method: str, path: str) -> str | None:
        """The fault for a request to `path` (`bucket/key`), or None to forward it."""
        with self.lock:
            self.counts["requests"] += 1
            bucket, _, key = path.partition("/")
            if bucket in self.deny_buckets or (key and path.startswith(self.deny_prefixes)):
                fault: str | None = "access_denied"
            elif (first := self._first_fault(method, path)) is not None:
                fault = first
            elif self.rng.random() >= self.fault_rate:
                fault = None
            else:
                fault = self.rng.choice(self.faults)
            if fault:
                self.counts[fault] += 1
            self.requests.append((method, path, fault))
            return fault

    def _first_fault(self, method: str, path: str) -> str | None:
        for (wanted, part), fault in self.fail_first.items():
            if method == wanted and part in path and (method, path) not in self.failed_once:
                self.failed_once.add((method, path))
                return fault
        return None

    def start(self) -> FaultyS3:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
