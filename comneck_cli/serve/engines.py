"""Where the app runs: ``local`` (uvicorn in this process) or ``ray`` (Ray Serve replicas of the same app).

Both stop the same way on SIGTERM or Ctrl-C: no new connection is accepted, every request in flight is answered,
then the process exits (uvicorn's graceful shutdown; Ray Serve's replica draining).
"""

from __future__ import annotations

import signal
import socket
from typing import Callable

from comneck_cli.errors import ComneckError
from comneck_cli.serve import ServeConfig


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host``:``port`` (0: a free port), or one sentence saying why it cannot be."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart may bind while old sockets linger
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ComneckError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; pass another `host` or `port`",
                           params=["host", "port"]) from None
    return sock


def url_of(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run_local(config: ServeConfig, host: str, port: int, announce: Callable[[str], None]) -> None:
    """Serve the app under uvicorn until SIGTERM/SIGINT; ``announce(url)`` once it accepts connections (the port is
    known then even when ``port`` is 0)."""
    import uvicorn

    from comneck_cli.serve.app import build_app

    sock = listen(host, port)
    url = url_of(host, sock.getsockname()[1])

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                announce(url)

    server = Server(uvicorn.Config(build_app(config), lifespan="on", log_level="warning", access_log=False,
                                   timeout_graceful_shutdown=None))
    server.run(sockets=[sock])
    if not server.started:
        raise ComneckError(f"the server on {url} did not start; see the messages above")


def run_ray(config: ServeConfig, host: str, port: int, replicas: int, announce: Callable[[str], None],
            address: str | None = None) -> None:
    """Deploy the app as ``replicas`` Ray Serve replicas (each with its own models and batcher) behind Serve's proxy
    on ``host``:``port``, on the cluster at ``address`` (None: ``RAY_ADDRESS`` or a local one), until SIGTERM/SIGINT."""
    import ray
    from ray import serve

    if port == 0:
        with listen(host, 0) as probe:  # Serve's proxy takes a fixed port: pick a free one
            port = probe.getsockname()[1]
    stop = []
    # Taken before ray.init, which installs its own handlers: the caller's decide how the process exits.
    previous = {sig: signal.signal(sig, lambda s, f: stop.append(s)) for sig in (signal.SIGTERM, signal.SIGINT)}
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    for sig in previous:
        signal.signal(sig, lambda s, f: stop.append(s))
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(_deployment(config, replicas), name="comneck", route_prefix="/", blocking=False)
        announce(url_of(host, port))
        while not stop:
            signal.pause()
    finally:
        serve.shutdown()  # replicas drain their requests in flight first
        ray.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    signal.raise_signal(stop[0])  # exit as the signal asks, as the local engine does


def _deployment(config: ServeConfig, replicas: int):
    """The app of :func:`comneck_cli.serve.app.build_app` as a Ray Serve deployment, built on each replica."""
    from ray import serve

    @serve.ingress()
    class Comneck:
        def __init__(self, config: ServeConfig) -> None:
            self.config = config

        def __serve_build_asgi_app__(self):
            from comneck_cli.serve.app import build_app

            return build_app(self.config)

    # Each replica bounds its own queue; Serve's proxy keeps at most this many requests on one replica.
    return serve.deployment(Comneck, name="comneck", num_replicas=replicas,
                            max_ongoing_requests=config.max_queue + config.max_batch).bind(config)
