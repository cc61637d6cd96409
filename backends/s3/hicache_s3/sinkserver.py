"""A minimal in-memory S3 endpoint for measuring client-side overhead (benchmarks only).

moto is a complete S3 but spends milliseconds of Python per request, which hides any difference
between the backend and raw boto3. This server does almost nothing per request: objects live in
a dict, bodies move with one ``recv``/``sendall`` loop, connections stay open (HTTP/1.1). It
speaks just enough S3 for ``hicache bench storage`` and ``hicache_s3.perf``: HeadBucket,
PutObject (with ``If-None-Match: *``), GetObject, HeadObject, DeleteObjects (keys not parsed:
everything under the bucket is kept) and an always-empty ListObjectsV2. No authentication, no
checksums, no listing: never a substitute for the moto tests.

    python -m hicache_s3.sinkserver --port 0     # prints the endpoint URL
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import sys
import threading
from email.utils import formatdate

__all__ = ["SinkHandler", "main"]

_EMPTY_LIST = (
    b'<?xml version="1.0" encoding="UTF-8"?>'
    b'<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
    b"<KeyCount>0</KeyCount><IsTruncated>false</IsTruncated></ListBucketResult>"
)
_DELETE_RESULT = (
    b'<?xml version="1.0" encoding="UTF-8"?>'
    b'<DeleteResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"></DeleteResult>'
)
_PRECONDITION = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>PreconditionFailed</Code>'
    b"<Message>At least one of the pre-conditions you specified did not hold</Message></Error>"
)
_NO_SUCH_KEY = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>NoSuchKey</Code>'
    b"<Message>The specified key does not exist.</Message></Error>"
)


class SinkHandler(http.server.BaseHTTPRequestHandler):
    """One connection; objects shared through the class-level store."""

    protocol_version = "HTTP/1.1"
    store: dict[str, bytes] = {}
    lock = threading.Lock()

    def log_message(self, *args: object) -> None:
        pass

    def _reply(self, status: int, body: bytes = b"", *, head: bool = False, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Last-Modified", formatdate(usegmt=True))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        if body and not head:
            self.wfile.write(body)

    def _path(self) -> tuple[str, str]:
        path, _, query = self.path.partition("?")
        return path, query

    def do_PUT(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        path, _ = self._path()
        if path.count("/") < 2:  # CreateBucket
            self._reply(200)
            return
        with self.lock:
            if self.headers.get("If-None-Match") == "*" and path in self.store:
                exists = True
            else:
                exists = False
                self.store[path] = body
        if exists:
            self._reply(412, _PRECONDITION, Content_Type="application/xml")
        else:
            self._reply(200, ETag='"0"')

    def _get(self, *, head: bool) -> None:
        path, _ = self._path()
        if path.count("/") < 2 or (path.endswith("/") and path.count("/") == 2):
            body = b"" if head else _EMPTY_LIST  # HeadBucket / ListObjectsV2
            self._reply(200, body, Content_Type="application/xml")
            return
        with self.lock:
            data = self.store.get(path)
        if data is None:
            self._reply(404, b"" if head else _NO_SUCH_KEY, Content_Type="application/xml")
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Last-Modified", formatdate(usegmt=True))
        self.send_header("ETag", '"0"')
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def do_GET(self) -> None:
        self._get(head=False)

    def do_HEAD(self) -> None:
        self._get(head=True)

    def do_POST(self) -> None:  # DeleteObjects
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self._reply(200, _DELETE_RESULT, Content_Type="application/xml")

    def do_DELETE(self) -> None:
        path, _ = self._path()
        with self.lock:
            self.store.pop(path, None)
        self._reply(204)


def main(argv: list[str] | None = None) -> int:
    """Serve until killed; print the endpoint URL first."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    server = http.server.ThreadingHTTPServer((args.host, args.port), SinkHandler)
    server.daemon_threads = True
    print(f"http://{args.host}:{server.server_address[1]}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
