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
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from comneck_cli import weights as registry
from comneck_cli.errors import RegistryError

RELEASE_URL = "https://github.com/NYCU-MAPL/BridgingCompressionMLLM/releases/download/v1.0/"
RELEASE_URL_ENV = "COMNECK_RELEASE_URL"
ZOO_URL_ENV = "COMNECK_ZOO_URL"
RELEASE_FILES = tuple(f"d{s}_{q}.pth.tar" for s in (1, 2, 3) for q in (1, 2, 3, 4))
CHUNK = 1 << 20
TIMEOUT_S = 60

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


def download(url: str, target: Path, *, fix: str, progress: Progress | None = None) -> str:
    """Download ``url`` to ``target`` (resuming ``target.part`` if a previous call left one) -> its sha256 (hex).

    ``fix`` ends the error sentence when the URL cannot be fetched (e.g. "then run `comneck weights import ...`").
    """
    target = Path(target)
    part = target.with_name(target.name + ".part")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        have = part.stat().st_size if part.is_file() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            resumed = have > 0 and response.status == 206  # 200: the server sent the whole file again
            done = have if resumed else 0
            length = response.headers.get("Content-Length")
            total = done + int(length) if length is not None else None
            with open(part, "ab" if resumed else "wb") as out:
                if progress is not None:
                    progress(done, total)
                for chunk in iter(lambda: response.read(CHUNK), b""):
                    out.write(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the range starts at the end: the part is already complete
            return _finish(part, target)
        raise DownloadError(f"cannot download {url} (HTTP {exc.code} {exc.reason}); fetch it by hand and {fix}"
                            ) from exc
    except http.client.HTTPException as exc:  # the connection closed mid-file (IncompleteRead...)
        raise DownloadError(f"the download of {url} broke off ({type(exc).__name__}); run the command again to "
                            f"resume it, or fetch the file by hand and {fix}") from exc
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise DownloadError(f"cannot reach {url} ({reason}); download it on a connected machine and {fix}") from exc
    except OSError as exc:
        raise DownloadError(f"cannot write {part} ({exc.strerror or exc}); free some space or set COMNECK_HOME to "
                            "another folder") from exc
    if total is not None and done != total:
        raise DownloadError(f"the download of {url} stopped at {done} of {total} bytes; run the command again to "
                            f"resume it, or fetch the file by hand and {fix}")
    return _finish(part, target)


def _finish(part: Path, target: Path) -> str:
    os.replace(part, target)
    return registry.file_sha256(target)
