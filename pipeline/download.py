"""HTTP(S) download with a progress bar, a sha256 check and no partial file left behind."""
from __future__ import annotations

import hashlib
import http.client
import os
import socket
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from tqdm import tqdm

CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """The download failed (HTTP error, no network, truncated body or checksum mismatch)."""


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def download(url: str, dest: str | os.PathLike, sha256: Optional[str] = None, timeout: float = 60.0,
             progress: bool = True) -> str:
    """Downloads `url` to `dest` through a temporary file in the same folder, renamed when complete.

    Args:
        url: an http:// or https:// address.
        dest: the final file; it only appears once the body is complete and verified.
        sha256: expected hex digest (case-insensitive); None skips the check.
        timeout: seconds to wait on the connection and on each read.
        progress: show a tqdm bar on stderr.

    Returns:
        The hex sha256 of the downloaded file.

    Raises:
        DownloadError: with the URL and the reason; nothing is left at `dest` or beside it.
    """
    if not url.startswith(("http://", "https://")):
        raise DownloadError(f"{url}: only http:// and https:// addresses can be downloaded")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        digest = _fetch(url, fd, timeout, progress)
        if sha256 is not None and digest != sha256.strip().lower():
            raise DownloadError(f"{url}: sha256 mismatch: expected {sha256.strip().lower()}, got "
                                f"{digest}; the file was deleted (wrong URL or checksum?)")
        os.replace(tmp, dest)
        return digest
    except urllib.error.HTTPError as err:
        raise DownloadError(f"{url}: HTTP error {err.code} {err.reason}") from None
    except urllib.error.URLError as err:
        raise DownloadError(f"{url}: cannot connect ({err.reason}); without network access, download "
                            "the file elsewhere and give its local path instead") from None
    except http.client.HTTPException as err:  # e.g. IncompleteRead: the server hung up mid-body
        raise DownloadError(f"{url}: incomplete response ({err!r})") from None
    except (socket.timeout, TimeoutError, ConnectionError) as err:
        raise DownloadError(f"{url}: connection failed or timed out after {timeout} s ({err})") from None
    finally:
        Path(tmp).unlink(missing_ok=True)


def _fetch(url: str, fd: int, timeout: float, progress: bool) -> str:
    """Streams the body of `url` into the open file `fd` (closed here); returns its sha256."""
    h = hashlib.sha256()
    request = urllib.request.Request(url, headers={"User-Agent": "codetr-pipeline"})
    with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        received = 0
        with tqdm(total=total, unit="B", unit_scale=True, desc=Path(url).name or url,
                  disable=not progress, file=sys.stderr) as bar:
            while block := response.read(CHUNK):
                out.write(block)
                h.update(block)
                received += len(block)
                bar.update(len(block))
        if total is not None and received != total:
            raise DownloadError(f"{url}: connection closed after {received} of {total} bytes")
        out.flush()
        os.fsync(out.fileno())
    return h.hexdigest()
