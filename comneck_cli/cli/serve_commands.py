"""``comneck serve``: options and messages over :mod:`comneck_cli.serve`."""

from __future__ import annotations

from pathlib import Path

import click

from comneck_cli.cli.options import clip_options, max_pixels_option
from comneck_cli.cli.plumbing import guard, quiet_imports
from comneck_cli.mllm import MAX_NEW_TOKENS

STOPPED = "stopped; every request in flight was answered"


@click.command()
@click.option("--mllm", default=None, help="LLaVA checkpoint folder or cached hub id that answers POST /v1/ask "
                                           "(without it /v1/ask answers 501).")
@click.option("--neck", default=None, help="Neck file or registry name for /v1/features and /v1/ask?via=neck "
                                           "(default: the registry's neck of each record's codec).")
@click.option("--adapter", default=None, help="Decoder adapter for via=adapter (default: the registry's).")
@click.option("--weights", default=None, help="Codec weights file or registry name for decoding the records "
                                              "(every endpoint, /v1/ask included; checked by digest).")
@clip_options("open_clip model for via=reconstruction/uncompressed/adapter when no neck is given.",
              "Local CLIP weights file instead of the registry / open_clip cache.")
@click.option("--clip-config", type=click.Path(path_type=Path, exists=True), default=None,
              help="An open_clip model config JSON (or folder of them) to add before loading, for custom models "
                   "(on every replica).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 exposes the server to the network (use --token-file then).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port to listen on; 0 picks a free one (printed at start).")
@click.option("--token-file", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="File holding a bearer token every endpoint but /healthz then requires.")
@click.option("--max-body", type=click.IntRange(1), default=16 << 20, show_default=True,
              help="Largest request body in bytes; a larger one gets 413 before it is read.")
@click.option("--max-queue", type=click.IntRange(1), default=64, show_default=True,
              help="Requests that may wait for the model; beyond them the server answers 503 with Retry-After.")
@click.option("--batch-size", type=click.IntRange(1, 1024), default=8, show_default=True,
              help="Most requests that share one forward pass.")
@click.option("--batch-wait", type=click.FloatRange(0, 10000), default=5.0, show_default=True,
              help="Milliseconds a request waits for others to share its forward pass.")
@click.option("--max-new-tokens", type=click.IntRange(1, MAX_NEW_TOKENS), default=64, show_default=True,
              help="/v1/ask's answer length when the request does not say.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: uvicorn in this process; ray: Ray Serve replicas of the same app (RAY_ADDRESS picks "
                   "the cluster).")
@click.option("--replicas", type=click.IntRange(1), default=1, show_default=True,
              help="With --engine ray: replicas of the app, each with its own models.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where the networks run.")
@max_pixels_option
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def serve(mllm: str | None, neck: str | None, adapter: str | None, weights: str | None, clip_model: str,
          clip_tag: str, clip_weights: Path | None, clip_config: Path | None,
          host: str, port: int, token_file: Path | None, max_body: int,
          max_queue: int, batch_size: int, batch_wait: float, max_new_tokens: int, engine: str, replicas: int,
          device: str, max_pixels: int | None, debug: bool) -> None:
    """Serve features, decoded images and MLLM answers of .cnk records over HTTP.

    POST /v1/features (query via, layer, select, for, format=safetensors|npy|pt), /v1/decode (PNG) and
    /v1/ask?prompt=TEXT take a .cnk record as the body and answer what `comneck features`, `decode` and `ask`
    write for it; GET /healthz and /metrics (Prometheus). SIGTERM stops accepting, answers what is in flight, exits.
    """
    if replicas > 1 and engine != "ray":
        raise click.UsageError("--replicas needs --engine ray")
    with guard(debug, STOPPED):
        from comneck_cli.serve import ServeConfig, missing_extra, read_token

        problem = missing_extra(engine)
        if problem is not None:
            raise problem
        quiet_imports()
        if mllm is not None:  # the model loads at the first /v1/ask: a wrong --mllm is refused now, not then
            from comneck_cli.cli.mllm_commands import quiet_transformers
            from comneck_cli.mllm.model import checkpoint_config

            checkpoint_config(mllm)
            quiet_transformers()  # its weight-loading bar at the first /v1/ask stays off the server's log
        config = ServeConfig(neck=neck, adapter=adapter, weights=weights, clip_model=clip_model, clip_tag=clip_tag,
                             clip_weights=clip_weights, clip_config=clip_config, mllm=mllm, device=device,
                             max_pixels=max_pixels, max_body=max_body, max_queue=max_queue, max_batch=batch_size,
                             batch_wait=batch_wait / 1000, max_new_tokens=max_new_tokens,
                             token=read_token(token_file) if token_file is not None else None)
        from comneck_cli.serve.engines import run_local, run_ray

        def announce(url: str) -> None:
            click.echo(f"comneck: serving on {url} ({engine}{f', {replicas} replicas' if engine == 'ray' else ''})",
                       err=True)

        if engine == "ray":
            run_ray(config, host, port, replicas, announce)
        else:
            run_local(config, host, port, announce)
