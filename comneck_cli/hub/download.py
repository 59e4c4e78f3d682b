"""Downloads of model files: one URL -> one local file, resumable, its sha256 recorded (standard library only).

:func:`download` writes the bytes to ``NAME.part`` beside the target and renames it when complete. An interrupted
download leaves the ``.part`` file, and the next call asks the server for the rest only (HTTP ``Range: bytes=N-``);
a server that ignores the range (``200`` instead of ``206``) sends the whole file again and the part starts over.
Without a connection the error is one sentence: which URL to fetch by hand, and the ``fix`` the caller gives
(which import command to run then).

The ComNeck authors' release (issue #18) lives under :data:`RELEASE_URL`; the environment variable
``COMNECK_RELEASE_URL`` points elsewhere (a mirror, or a local server in tests), and ``COMNECK_ZOO_URL`` does the
same for CompressAI's zoo files (:func:`mirrored`).
"""

from __future__ import annotations

import http.client
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from comneck_cli import weights as registry
from comneck_cli.errors import ComneckError, RegistryError

RELEASE_URL = "https://github.com/NYCU-MAPL/BridgingCompressionMLLM/releases/download/v1.0/"
RELEASE_URL_ENV = "COMNECK_RELEASE_URL"
ZOO_URL_ENV = "COMNECK_ZOO_URL"
RELEASE_FILES = tuple(f"d{s}_{q}.pth.tar" for s in (1, 2, 3) for q in (1, 2, 3, 4))
CHUNK = 1 << 20
STALL_S = 60  # a server that sends nothing for this long is given up (the part stays, to resume)
DEADLINE_S = 4 * 3600  # one file's whole download, however it trickles
MAX_BYTES = 2 << 30  # what a model file comneck downloads can be (the release's and zoo's are far smaller)

# progress(bytes so far, total bytes or None when the server does not say)
Progress = Callable[[int, "int | None"], None]


class DownloadError(RegistryError):
    """A model file could not be downloaded: the message says which URL to fetch by hand and what to run then."""


def release_url(name: str) -> str:
    """The URL of one released file: ``$COMNECK_RELEASE_URL/name``, else the authors' release v1.0."""
    return os.environ.get(RELEASE_URL_ENV, RELEASE_URL).rstrip("/") + "/" + name


def mirrored(url: str, env: str = ZOO_URL_ENV) -> str:
    """``url``, or the file of the same name under the folder URL in environment variable ``env`` when it is set."""
    base = os.environ.get(env)
    return url if not base else base.rstrip("/") + "/" + url.rsplit("/", 1)[-1]


def download(url: str, target: Path, *, fix: str, progress: Progress | None = None, max_bytes: int = MAX_BYTES,
             check: Callable[[Path], None] | None = None) -> str:
    """Download ``url`` to ``target`` (resuming ``target.part`` if a previous call left one) -> its sha256 (hex).

    ``fix`` ends the error sentence when the URL cannot be fetched (e.g. "then run `comneck weights import ...`").
    A file over ``max_bytes`` (what such a file can be: the server's length or the bytes themselves) is refused, a
    server silent for :data:`STALL_S` or slower than :data:`DEADLINE_S` in all is given up (the part stays, to
    resume), and the bytes must add up to the length the server announced and to the range asked for. ``check``
    (which raises a ComneckError for a file that is not what was asked for) runs on the part before it is named
    ``target``. Folders made for the download are removed again when it fails and leaves them empty.
    """
    target = Path(target)
    part = target.with_name(target.name + ".part")
    made = [folder for folder in (target.parent, *target.parent.parents) if not folder.exists()]
    try:
        return _download(url, target, part, fix, progress, max_bytes, check)
    finally:
        for folder in made:  # innermost first; only empty ones go (a part to resume keeps its folder)
            try:
                folder.rmdir()
            except OSError:
                break


def _download(url: str, target: Path, part: Path, fix: str, progress: Progress | None, max_bytes: int,
              check: Callable[[Path], None] | None) -> str:
    have = part.stat().st_size if part.is_file() else 0
    again = f"run the command again to resume it, or fetch the file by hand and {fix}"
    started = False  # whether the server has answered: a timeout after that is a stall, not an unreachable host
    try:
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        with urllib.request.urlopen(request, timeout=STALL_S) as response:
            started = True
            start, total = _extent(url, response, have)
            if total is not None and total > max_bytes:
                raise DownloadError(f"{url} is {total} bytes, more than such a file can be ({max_bytes}); check the "
                                    f"URL (or its mirror) and {fix}")
            done, deadline = start, time.monotonic() + DEADLINE_S
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(part, "r+b" if start else "wb") as out:
                out.truncate(start)  # a range that restarts at 0 rewrites the part; else it continues it
                out.seek(start)
                if progress is not None:
                    progress(done, total)
                while chunk := response.read1(CHUNK):  # what arrived, so that a trickle meets the deadline
                    out.write(chunk)
                    done += len(chunk)
                    if done > (max_bytes if total is None else total):
                        raise DownloadError(f"{url} sent more than its {total or max_bytes} bytes; check the URL "
                                            f"(or its mirror) and {fix}")
                    if time.monotonic() > deadline:
                        raise DownloadError(f"the download of {url} took over {DEADLINE_S} s and was given up at "
                                            f"{done} bytes; {again}")
                    if progress is not None:
                        progress(done, total)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the range starts at or past the end: complete, or longer than the file
            if _range_total(exc.headers.get("Content-Range")) == have:
                return _finish(part, target, url, check)
            part.unlink(missing_ok=True)  # more bytes than the file holds: they cannot be the file
            return _download(url, target, part, fix, progress, max_bytes, check)
        raise DownloadError(f"cannot download {url} (HTTP {exc.code} {exc.reason}); fetch it by hand and {fix}"
                            ) from exc
    except http.client.HTTPException as exc:  # the connection closed mid-file (IncompleteRead...)
        raise DownloadError(f"the download of {url} broke off ({type(exc).__name__}); {again}") from exc
    except TimeoutError as exc:
        if started:
            raise DownloadError(f"the download of {url} stalled (no data for {STALL_S} s); {again}") from exc
        raise DownloadError(f"cannot reach {url} (timed out); download it on a connected machine and {fix}") from exc
    except (urllib.error.URLError, ConnectionError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise DownloadError(f"cannot reach {url} ({reason}); download it on a connected machine and {fix}") from exc
    except OSError as exc:
        raise DownloadError(f"cannot write {part} ({exc.strerror or exc}); free some space or set COMNECK_HOME to "
                            "another folder") from exc
    if total is not None and done != total:
        raise DownloadError(f"the download of {url} stopped at {done} of {total} bytes; {again}")
    return _finish(part, target, url, check)


def _extent(url: str, response: http.client.HTTPResponse, have: int) -> tuple[int, int | None]:
    """(the byte the body starts at, the file's whole length or None) from a response to a request for bytes
    ``have``- (none: ``have`` 0): a 206's Content-Range must start at ``have`` or at 0 (the whole file again, as
    a 200), and lengths must be whole numbers; anything else is a DownloadError."""
    length = response.headers.get("Content-Length")
    if length is not None and not length.strip().isdecimal():
        raise DownloadError(f"{url} answered with an invalid Content-Length {length[:40]!r}; the server or a proxy "
                            "on the way is broken, try again later or fetch the file by hand")
    if response.status != 206:  # 200: the whole file, whatever was asked
        return 0, None if length is None else int(length)
    match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", (response.headers.get("Content-Range") or "").strip())
    first, last, total = map(int, match.groups()) if match else (-1, -1, -1)
    if first not in (0, have) or last != total - 1 or (length is not None and int(length) != total - first):
        raise DownloadError(f"{url} answered the request for bytes {have}- with the range "
                            f"{response.headers.get('Content-Range')!r}; the server or a proxy on the way is "
                            "broken, try again later or fetch the file by hand")
    return first, total


def _range_total(content_range: str | None) -> int | None:
    """The file length of a 416's ``Content-Range: bytes */LENGTH``, or None."""
    match = re.fullmatch(r"bytes \*/(\d+)", (content_range or "").strip())
    return int(match.group(1)) if match else None


def _finish(part: Path, target: Path, url: str, check: Callable[[Path], None] | None) -> str:
    if check is not None:
        try:
            check(part)
        except ComneckError as exc:  # bytes that arrived whole but are not the file: never resume or reuse them
            part.unlink(missing_ok=True)
            raise DownloadError(f"the file downloaded from {url} is damaged ({exc}); run the command again to "
                                "download it afresh") from exc
    os.replace(part, target)
    return registry.file_sha256(target)
