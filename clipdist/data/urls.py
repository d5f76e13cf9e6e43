"""Where shards and the small files beside them come from: local paths, ``http(s)://`` URLs and
``pipe:`` commands (``pipe:curl -s -f URL``, ``pipe:aws s3 cp s3://... -``).

Failures are sorted by what a retry can change. A shard that is not there (no such file, HTTP
404/410) or whose archive is cut (``TruncatedArchive``) stays so; a refused or dropped
connection, a server error or a failing pipe command may not, and is retried (sources.py).

A small file beside a shard (an index, img2dataset's ``_stats.json``) is read through the same
opener by swapping the file name: in the path, in the URL, or inside the pipe command.
"""

from __future__ import annotations

import http.client
import io
import re
import time
import urllib.error
import urllib.request
from typing import BinaryIO, Callable, Optional

from webdataset.gopen import gopen

from clipdist.config import is_local

# A socket that delivers nothing for this long counts as a dropped connection (then retried):
# a silent server must not hang a rank.
READ_TIMEOUT_S = 60.0
SMALL_FILE_RETRIES = 3
NAME_MARK = "\0"


class ShardAbsent(OSError):
    """The file is not there (HTTP 404/410, no such file): retrying cannot help."""


class TruncatedArchive(OSError):
    """The tar ended without its end-of-archive blocks although the transport delivered every byte:
    the file itself is cut, so retrying cannot help."""


class ConnectionCut(OSError):
    """The connection closed before the body it announced was delivered."""


PERMANENT_ERRORS = (ShardAbsent, TruncatedArchive, FileNotFoundError)
RETRY_BACKOFF_S = 0.5  # before the first retry; doubles after each


def retry_delay(attempt: int) -> float:
    return RETRY_BACKOFF_S * 2**attempt


def is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


# ---------------------------------------------------------------------------------------------
# File names inside paths, URLs and pipe commands


def _name_span(url: str) -> tuple[int, int]:
    """Start and end of the file name in ``url``: the last path segment of a path or URL, or of
    the last path-like argument of a ``pipe:`` command (query strings and quotes excluded)."""
    end = len(url)
    if url.startswith("pipe:"):
        tokens = [m for m in re.finditer(r"\S+", url[5:]) if "/" in m.group() and not m.group().startswith(("-", ">", "2>", "|"))]
        if not tokens:
            raise ValueError(f"{url}: no path or URL in the pipe command")
        token = tokens[-1]
        start, end = token.start() + 5, token.end() + 5
        while end > start and url[end - 1] in "'\"":
            end -= 1
    else:
        start = 0
    query = url.find("?", start, end)
    if query >= 0 and not is_local(url):
        end = query
    return url.rfind("/", start, end) + 1 or start, end


def split_name(url: str) -> tuple[str, str]:
    """(folder, file name): the folder is the URL with a mark in place of the name, what the
    shards of one folder share."""
    start, end = _name_span(url)
    return url[:start] + NAME_MARK + url[end:], url[start:end]


def file_name(url: str) -> str:
    return split_name(url)[1]


def sibling(url: str, name: str) -> str:
    """``url`` with its file name replaced by ``name``: the file beside it, read the same way."""
    return siblings(url)(name)


def siblings(url: str) -> Callable[[str], str]:
    """``sibling(url, ·)`` with the URL parsed once (an index names 100,000 shards)."""
    start, end = _name_span(url)
    head, tail = url[:start], url[end:]
    return lambda name: head + name + tail


def folder_of(url: str) -> str:
    return split_name(url)[0]


# ---------------------------------------------------------------------------------------------
# Opening


class HttpBody(io.RawIOBase):
    """An HTTP response body that ends where the connection ends, remembering whether that was
    before the announced length, so the tar reader can keep every sample it completed."""

    def __init__(self, response: http.client.HTTPResponse, url: str):
        self.response, self.url = response, url
        self.cut: Optional[BaseException] = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.cut is not None:
            return 0
        try:
            n = self.response.readinto(buffer)
        except (http.client.HTTPException, OSError) as error:  # reset, timeout, a broken chunk
            self.cut = error
            return 0
        if n == 0 and len(buffer) and self.response.length:
            # http.client ends a body quietly when the connection closes before Content-Length.
            self.cut = ConnectionCut(f"{self.response.length} bytes of the announced body never came")
        return n

    def close(self) -> None:
        self.response.close()
        super().close()

    def check_complete(self) -> None:
        if self.cut is not None:
            raise ConnectionCut(f"connection closed early ({type(self.cut).__name__}: {self.cut})")


def open_http(url: str, timeout: float = READ_TIMEOUT_S) -> http.client.HTTPResponse:
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "clipdist"}), timeout=timeout)
    except urllib.error.HTTPError as error:
        error.close()
        if error.code in (404, 410):
            raise ShardAbsent(f"HTTP {error.code}") from None
        raise OSError(f"HTTP {error.code} {error.reason}") from None
    except urllib.error.URLError as error:
        raise OSError(f"{type(error.reason).__name__}: {error.reason}") from None


def open_stream(url: str) -> BinaryIO:
    """A binary stream of the file at ``url``. For http(s) it is an ``HttpBody`` (buffered)."""
    if is_http(url):
        return io.BufferedReader(HttpBody(open_http(url), url), buffer_size=1 << 16)
    if is_local(url):
        try:
            return open(url, "rb")
        except FileNotFoundError:
            raise ShardAbsent("no such file") from None
    return gopen(url, "rb")


def check_complete(stream: BinaryIO) -> None:
    """Raise ConnectionCut if an HTTP stream ended before its announced length."""
    raw = getattr(stream, "raw", None)
    if isinstance(raw, HttpBody):
        raw.check_complete()


def read_small_file(url: str, retries: int = SMALL_FILE_RETRIES) -> Optional[bytes]:
    """The bytes of a small file (an index, a stats file), or None when it is not there. A pipe
    command that fails counts as "not there": its exit status cannot say why. Other failures are
    retried with backoff, then raised as one line naming the file."""
    for attempt in range(retries + 1):
        try:
            return _read_whole(url)
        except (ShardAbsent, FileNotFoundError):
            return None
        except OSError as error:
            if url.startswith("pipe:"):
                return None
            if attempt == retries:
                raise OSError(f"{url}: unreadable after {retries + 1} attempts: {error}") from None
            time.sleep(retry_delay(attempt))
    raise AssertionError("unreachable")


def _read_whole(url: str) -> bytes:
    stream = open_stream(url)
    try:
        data = stream.read()
        check_complete(stream)
    finally:
        stream.close()  # a pipe's exit status is checked here
    return data
