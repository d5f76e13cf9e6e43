"""A real HTTP server on 127.0.0.1 for the tests of remote shards, with the faults of real ones:
404 for chosen files, every n-th shard transfer cut off mid-way (Content-Length announced, the
connection closed early), and names mapped onto other files (100,000 shard URLs from a few tars).
Every request is logged with what it was sent, so a test can state what the server withheld."""

from __future__ import annotations

import os
import socket
import tarfile
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Optional


@dataclass
class Request:
    path: str
    status: int
    bytes_sent: int
    cut_at: Optional[int] = None  # bytes sent before the connection was closed; None: complete


class ShardServer:
    def __init__(self, root: Path, missing: tuple[str, ...] = (), cut_every: int = 0, cut_fraction: float = 0.5,
                 alias: Optional[Callable[[str], Optional[str]]] = None, tar_delay_s: float = 0.0):
        self.root, self.missing, self.cut_every, self.cut_fraction = Path(root), set(missing), cut_every, cut_fraction
        self.tar_delay_s = tar_delay_s  # before each .tar response: a slow server
        self.alias = alias  # name -> name of the file to serve instead, or None
        self.requests: list[Request] = []
        self._tar_gets = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "ShardServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def base(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"

    def gets(self, suffix: str = "") -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.path.endswith(suffix)]

    def _file(self, name: str) -> Optional[Path]:
        if name in self.missing:
            return None
        mapped = self.alias(name) if self.alias else None
        path = self.root / (mapped or name)
        return path if path.is_file() else None

    def _cut(self, name: str, size: int) -> Optional[int]:
        if not (self.cut_every and name.endswith(".tar")):
            return None
        with self._lock:
            self._tar_gets += 1
            if self._tar_gets % self.cut_every:
                return None
        return int(size * self.cut_fraction)

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                name = self.path.lstrip("/")
                path = server._file(name)
                if path is None:
                    self.send_error(404, "File not found")
                    server._log(Request(self.path, 404, 0))
                    return
                data = path.read_bytes()
                cut = server._cut(name, len(data))
                if name.endswith(".tar"):
                    time.sleep(server.tar_delay_s)
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data if cut is None else data[:cut])
                self.wfile.flush()
                if cut is not None:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                server._log(Request(self.path, 200, len(data) if cut is None else cut, cut))

            def log_message(self, *args) -> None:
                pass

        return Handler

    def _log(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)


def complete_samples_before(path: str | os.PathLike, cut: int) -> int:
    """Samples of a tar that a reader receiving only its first ``cut`` bytes can know it has whole:
    those followed by the complete header of the next sample (the last one needs the whole file)."""
    starts: dict[str, int] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            starts.setdefault(member.name.split(".", 1)[0], member.offset)
    following = sorted(starts.values())[1:]
    return sum(start + 512 <= cut for start in following)
