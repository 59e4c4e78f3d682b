"""The two engines that run a plan's chunks through :meth:`Job.run`: this process (:func:`run_local`) or Ray Data
over a fixed pool of actors (:func:`run_ray`, :class:`Worker`). Importing this module does not import Ray."""

from __future__ import annotations

import json
import logging
import os
import traceback
from dataclasses import dataclass
from typing import Any, Iterator

from comneck_cli.errors import ComneckError
from comneck_cli.batch.jobs import Job, failure_reason
from comneck_cli.batch.plan import Item

RAY_MISSING = "`engine` ray needs Ray, which is not installed: pip install 'comneck[ray]'"


_LISTS = ("params", "warnings")  # the columns a Ray row carries as JSON


class Worker:
    """Ray Data callable class: one per actor. Loads the models once, then runs each row (one chunk of the
    driver's plan) through :meth:`Job.run`, writing the outputs from the actor.

    A model that fails to load is reported as a ``setup`` row rather than raised: Ray would otherwise retry
    the actor and bury the reason in its logs. The driver turns that row into one error sentence.
    """

    def __init__(self, job: Job) -> None:
        self.job, self.setup_error, self.setup_params = job, "", []
        try:
            job.open()
        except Exception as exc:  # noqa: BLE001 - reported by the driver, see the class docstring
            self.setup_error = failure_reason(exc) if not job.debug else "".join(traceback.format_exception(exc))
            self.setup_params = list(getattr(exc, "params", ()))

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        rows: list[dict] = []
        for chunk in batch["chunk"]:
            items = [Item(*entry) for entry in json.loads(str(chunk))]
            if self.setup_error:
                rows.append({"path": "", "status": "setup", "reason": self.setup_error,
                             "params": self.setup_params, "warnings": [], "traceback": ""})
                continue
            rows.extend(self.job.run(items))
        columns = {key: np.array([json.dumps(r[key]) if key in _LISTS else str(r[key]) for r in rows], dtype=object)
                   for key in ("path", "status", "reason", "params", "warnings", "traceback")}
        return columns


def run_local(job: Job, plan: list[list[Item]]) -> Iterator[dict]:
    """This process, chunk after chunk: the same Job.run a Ray worker calls."""
    job.open()
    for chunk in plan:
        yield from job.run(chunk)


@dataclass
class RayOptions:
    address: str | None = None
    workers: int | None = None
    num_gpus: float = 0.0
    num_cpus: float = 1.0


def run_ray(job: Job, plan: list[list[Item]], options: RayOptions, debug: bool = False) -> Iterator[dict]:
    """Ray Data over the plan's chunks; a fixed pool of actors, each with ``num_gpus`` GPUs and ``num_cpus``
    CPUs. Starts a Ray instance on this machine unless one is running in this process, ``--address`` names a
    cluster, or ``RAY_ADDRESS`` is set."""
    problem = ray_problem()  # here, with the install hint or the real reason, not inside a worker
    if problem is not None:
        raise problem
    import ray
    started = False
    if not ray.is_initialized():
        address = options.address or os.environ.get("RAY_ADDRESS")
        kwargs: dict[str, Any] = {"logging_level": logging.INFO if debug else logging.ERROR,
                                  "log_to_driver": debug}
        if address is None:
            kwargs["include_dashboard"] = False
        else:
            _probe(address)
        try:
            ray.init(address=options.address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ComneckError(f"cannot start or reach Ray at {address or 'this machine'} "
                               f"({str(exc).splitlines()[0]}); start a cluster with `ray start --head` or leave "
                               f"out `address`", params=["address"]) from None
        started = True
    try:
        if ray.util.client.ray.is_connected():
            yield from _through_client(ray, job, plan, options, debug)
        else:
            yield from _map_chunks(job, plan, options, debug)
    finally:
        if started:
            ray.shutdown()


def _map_chunks(job: Job, plan: list[list[Item]], options: RayOptions, debug: bool) -> Iterator[dict]:
    """The Ray Data pipeline itself: from_items(chunks) -> map_batches(Worker) on a fixed actor pool."""
    import ray
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the command draws one bar for the whole job
    context.print_on_execution_start = False
    if not debug:
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    workers = options.workers or _pool_size(ray.cluster_resources(), options)
    workers = max(1, min(workers, len(plan)))
    rows = [{"chunk": json.dumps([[i.source, i.label, i.relative] for i in chunk])} for chunk in plan]
    dataset = ray.data.from_items(rows, override_num_blocks=min(len(rows), max(200, 16 * workers)))
    results = dataset.map_batches(
        Worker,
        fn_constructor_kwargs={"job": job},
        batch_size=1,  # one row is one chunk of the plan: batches never depend on Ray's block layout
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=options.num_cpus,
        num_gpus=options.num_gpus,
    )
    for row in results.iter_rows():
        if row["status"] == "setup":
            raise ComneckError(f"a Ray worker could not load the models: {row['reason']}",
                               params=json.loads(row["params"]))
        yield {key: json.loads(row[key]) if key in _LISTS else row[key]
               for key in ("path", "status", "reason", "params", "warnings", "traceback")}


class _ClusterDriver:
    """Runs :func:`_map_chunks` on the cluster for a Ray Client (``ray://``) connection, whose client side
    cannot run Ray Data's executor; the client polls it for outcomes. A threaded actor: ``poll`` answers
    while ``run`` works."""

    def __init__(self) -> None:
        self.outcomes: list[dict] = []
        self.finished, self.error = False, None

    def run(self, job: Job, plan: list[list[Item]], options: RayOptions, debug: bool) -> None:
        try:
            for outcome in _map_chunks(job, plan, options, debug):
                self.outcomes.append(outcome)
        except Exception as exc:  # noqa: BLE001 - handed to the client, which raises it
            self.error = exc if isinstance(exc, ComneckError) else ComneckError(f"{type(exc).__name__}: {exc}")
        finally:
            self.finished = True

    def poll(self, start: int) -> tuple[list[dict], bool, ComneckError | None]:
        finished = self.finished  # read first: when True, every outcome is already in the list
        return self.outcomes[start:], finished, self.error


def _through_client(ray, job: Job, plan: list[list[Item]], options: RayOptions, debug: bool) -> Iterator[dict]:
    import time

    driver = ray.remote(num_cpus=0, max_concurrency=2)(_ClusterDriver).remote()
    try:
        driver.run.remote(job, plan, options, debug)
        seen = 0
        while True:
            new, finished, error = ray.get(driver.poll.remote(seen))
            seen += len(new)
            yield from new
            if finished:
                break
            time.sleep(0.5)
        if error is not None:
            raise error
    finally:
        ray.kill(driver)


def _probe(address: str) -> None:
    """Ray retries an unreachable HOST:PORT for minutes: check that something listens there first."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if address == "auto" or not port.isdigit():
        return
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=10).close()
    except OSError as exc:
        raise ComneckError(f"cannot reach a Ray cluster at {address} ({exc.strerror or exc}); check `address` "
                           f"or RAY_ADDRESS, or leave both out to run Ray on this machine", params=["address"]) from None


def _pool_size(resources: dict[str, float], options: RayOptions) -> int:
    """As many workers as the cluster holds: its CPUs / CPUs per worker, and with GPUs its GPUs / GPUs per
    worker, whichever is fewer (a fixed pool waits for every actor to be placed)."""
    workers = int(resources.get("CPU", 1) // options.num_cpus)
    if options.num_gpus > 0:
        gpus = resources.get("GPU", 0)
        if gpus < options.num_gpus:
            raise ComneckError(f"`num_gpus` {options.num_gpus:g} but the Ray cluster has {gpus:g} "
                               f"GPUs; lower it, or use 0 for CPU workers", params=["num_gpus"])
        workers = min(workers, int(gpus // options.num_gpus))
    return max(1, workers)



def ray_problem() -> ComneckError | None:
    """Why ``--engine ray`` cannot run here, or None. Ray is imported, not only looked for: an installed Ray whose
    import fails (e.g. a pyarrow built for another numpy) must say so, not that Ray is missing."""
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - whatever a broken install raises, it is the reason to show
        if isinstance(exc, ModuleNotFoundError) and exc.name in ("ray", "ray.data"):
            return ComneckError(RAY_MISSING, params=["engine"])
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return ComneckError(f"`engine` ray: Ray is installed but importing it failed ({type(exc).__name__}: {first}); "
                            "fix that installation, or use `engine` local", params=["engine"])
    return None
