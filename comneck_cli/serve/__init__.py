"""``comneck serve``: the cloud side as an HTTP service, the records in and the features, images and answers out.

One ASGI app (:func:`comneck_cli.serve.app.build_app`, Starlette) serves the endpoints on either engine: ``local``
runs it under uvicorn in this process (:func:`comneck_cli.serve.engines.run_local`), ``ray`` deploys the same app
as Ray Serve replicas (:func:`comneck_cli.serve.engines.run_ray`). Each request's records go through the library
functions ``comneck features``, ``decode`` and ``ask`` call (:mod:`comneck_cli.serve.work`), so the answers are the
CLI's byte for byte; requests that arrive together share one forward pass (:mod:`comneck_cli.serve.batching`).

Importing this module imports neither torch nor Starlette: the CLI imports it at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from comneck_cli.errors import ComneckError

SERVE_MISSING = "`serve` needs Starlette and uvicorn, which are not installed: pip install 'comneck[serve]'"
RAY_SERVE_MISSING = "`engine` ray needs Ray Serve, which is not installed: pip install 'comneck[serve]'"


@dataclass(frozen=True)
class ServeConfig:
    """What a server (every replica of it) loads and how it bounds its work.

    The model options mean what ``comneck features``/``decode``/``ask`` take (``neck``, ``adapter``, ``weights``,
    ``clip_*``; ``mllm`` for ``/v1/ask``); ``max_pixels`` bounds records as the CLI's option does (None: the
    environment's limits). ``max_body`` bounds a request body in bytes, ``max_queue`` the requests waiting for the
    model, ``max_batch`` the requests that share one forward pass, gathered for at most ``batch_wait`` seconds.
    ``token`` (None: no authentication) is what ``Authorization: Bearer`` must carry.
    """

    neck: str | None = None
    adapter: str | None = None
    weights: str | None = None
    clip_model: str = "ViT-L-14"
    clip_tag: str = "openai"
    clip_weights: Path | None = None
    clip_config: Path | None = None  # open_clip model configs to add on every replica before a tower is built
    mllm: str | None = None
    device: str = "auto"
    max_pixels: int | None = None
    max_body: int = 16 << 20
    max_queue: int = 64
    max_batch: int = 8
    batch_wait: float = 0.005
    max_new_tokens: int = 64
    token: str | None = field(default=None, repr=False)  # never in a log line


def read_token(path: Path) -> str:
    """The bearer token in the file ``path`` (surrounding whitespace dropped); an empty or unreadable file is an
    error, since serving with no token at all would silently open every endpoint."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ComneckError(f"cannot read `token_file` {path}: {getattr(exc, 'strerror', None) or exc}",
                           params=["token_file"]) from None
    if not token or any(c.isspace() for c in token):
        raise ComneckError(f"`token_file` {path} must hold one token without spaces", params=["token_file"])
    return token


def missing_extra(engine: str = "local") -> ComneckError | None:
    """Why ``engine`` cannot serve here (the extra is not installed), or None."""
    import importlib.util

    if any(importlib.util.find_spec(name) is None for name in ("starlette", "uvicorn", "prometheus_client")):
        return ComneckError(SERVE_MISSING)
    if engine == "ray":
        try:
            missing = importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None
        except ModuleNotFoundError:
            missing = True
        if missing:
            return ComneckError(RAY_SERVE_MISSING, params=["engine"])
    return None
