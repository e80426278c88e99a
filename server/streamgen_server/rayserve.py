"""The server on Ray Serve: a deployment whose replicas each run one whole server (`App`: the model loaded once, its
own scheduler and queue) behind the ASGI adapter, one replica per device. `streamgen serve --ray`.

A websocket stays on the replica that accepted it for its whole life, so a session's KV cache never moves: Ray's
proxy picks a replica when the handshake comes in, and that is the session affinity. Each open websocket is one
ongoing request of its replica (measured: tests/test_ray.py), so `max_ongoing_requests` = `--max-sessions` makes the
proxy send a connection only to a replica with a free slot, and autoscaling on ongoing requests scales on sessions.
A replica that Ray stops (scaled down, redeployed) drains: its clients are told `stopped` (reason "shutdown") and
their sockets closed with 1001, before Ray's graceful-shutdown timeout would cut them.

Needs the `ray` extra (`pip install -e ".[ray]"`); docs/scaling.md tells how to run it on one machine or a cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import threading

import ray
import torch
from ray import serve
from ray.serve.context import ReplicaContext, _get_global_client
from ray.util.metrics import Gauge

from .app import App, build
from .asgi import AsgiApp
from .routes import WEBSOCKET_PATH

log = logging.getLogger(__name__)

APP_NAME = "streamgen"
# How many replicas there are, where Ray is, which command ran: the deployment's business, not its replicas'. Left
# out of what a replica is built from, so that changing them rescales the deployment instead of replacing replicas.
NOT_FOR_REPLICAS = ("command", "run", "ray", "replicas", "min_replicas", "max_replicas", "address")
DRAIN_POLL_SECONDS = 1.0  # how often a replica asks the controller whether it is being stopped
METRICS_SECONDS = 5.0  # how often a replica copies its metrics into Ray's
GRACEFUL_SHUTDOWN_SECONDS = 30.0  # Ray's limit on a stopping replica: a drain takes a chunk and a flush


class ReplicaAsgi(AsgiApp):
    """The ASGI adapter of one replica, which also drains the replica once Ray starts stopping it, and exports its
    metrics through Ray's.

    Ray waits for a stopping replica's ongoing requests (its open websockets) and only then runs the ASGI shutdown,
    or kills it when its graceful-shutdown time is up; no public hook tells a replica earlier that it is stopping.
    So the replica watches its own state in the controller's view of the application (what `serve status` and the
    Serve REST API show) and shuts its server down as soon as that state turns STOPPING."""

    def __init__(self, app: App, replica: ReplicaContext) -> None:
        super().__init__(app)
        self.replica = replica
        self._tasks: list[asyncio.Task[None]] = []

    async def startup(self) -> None:
        await super().startup()
        self._tasks = [asyncio.create_task(self._drain_when_stopping()), asyncio.create_task(self._export_metrics())]

    async def _export_metrics(self) -> None:
        """This replica's `/metrics`, as Ray metrics with a `replica` tag, every few seconds. Through the proxy
        `/metrics` answers for whichever replica the request reached; Ray's metrics endpoint on every node (what
        Prometheus scrapes on a Ray cluster) has every replica's, each under its name."""
        gauges: dict[str, Gauge] = {}
        tags = {"replica": self.app.replica}
        while True:
            for name, help_text, labels, value in self.app.metrics.samples():
                if name not in gauges:
                    gauges[name] = Gauge(name, help_text, tag_keys=("replica", *labels))
                gauges[name].set(value, tags | labels)
            await asyncio.sleep(METRICS_SECONDS)

    async def _drain_when_stopping(self) -> None:
        while True:
            try:
                if await asyncio.to_thread(_stopping, self.replica):
                    break
            except Exception as e:  # noqa: BLE001 - the controller restarting: ask again
                log.warning("replica %s: cannot read its state: %s", self.app.replica, e)
            await asyncio.sleep(DRAIN_POLL_SECONDS)
        log.info("replica %s is stopping: draining %d connections", self.app.replica, len(self.app.connections))
        await self.shutdown()


def _stopping(replica: ReplicaContext) -> bool:
    """Whether the controller is stopping this replica: its state is STOPPING, or it (or its whole application,
    being deleted) is no longer listed."""
    application = _get_global_client().get_serve_details().get("applications", {}).get(replica.app_name)
    deployment = (application or {}).get("deployments", {}).get(replica.deployment, {})
    states = {state["replica_id"]: state["state"] for state in deployment.get("replicas", [])}
    return states.get(replica.replica_tag, "STOPPING") == "STOPPING"


@serve.deployment(graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_SECONDS)
@serve.ingress()  # the ASGI app is built in each replica, around the server it loads
class Replica:
    """One replica: the model loaded once, a whole server over it."""

    def __init__(self, args: argparse.Namespace) -> None:
        torch.set_num_threads(max(1, int(args.replica_cpus)))
        context = serve.get_replica_context()
        self.asgi = ReplicaAsgi(build(args, replica=context.replica_tag), context)

    def __serve_build_asgi_app__(self) -> ReplicaAsgi:
        return self.asgi


def application(args: argparse.Namespace) -> serve.Application:
    """The deployment `streamgen serve --ray` runs, from the same arguments as the plain server plus `--replicas`
    or `--min-replicas`/`--max-replicas`, and `--replica-cpus`."""
    if args.max_replicas is not None and args.min_replicas is None:
        raise ValueError("--max-replicas goes with --min-replicas (autoscaling between the two)")
    gpu = args.device == "cuda" or (args.device is None and ray.cluster_resources().get("GPU", 0) > 0)
    if args.min_replicas is None:
        scale = {"num_replicas": args.replicas}
    else:
        scale = {
            "autoscaling_config": {
                "min_replicas": args.min_replicas,
                "max_replicas": args.max_replicas or args.min_replicas,
                "target_ongoing_requests": args.max_sessions,  # every slot of every replica in use: one more
                "upscale_delay_s": 5,
                "downscale_delay_s": 60,
            }
        }
    options = {
        "max_ongoing_requests": args.max_sessions,
        "ray_actor_options": {"num_cpus": args.replica_cpus, "num_gpus": 1 if gpu else 0},
        **scale,
    }
    built = argparse.Namespace(**{name: value for name, value in vars(args).items() if name not in NOT_FOR_REPLICAS})
    return Replica.options(**options).bind(built)


def start(args: argparse.Namespace) -> None:
    """Join (`--address`) or start a Ray instance, then run the deployment behind Ray's HTTP proxy on --host:--port.
    Returns once every replica is up."""
    if not ray.is_initialized():
        ray.init(address=args.address, include_dashboard=False, logging_level=logging.WARNING)
    serve.start(http_options={"host": args.host, "port": args.port}, logging_config={"log_level": "WARNING"})
    serve.run(application(args), name=APP_NAME, route_prefix="/")


def main(args: argparse.Namespace) -> int:
    """`streamgen serve --ray`: serve until SIGINT or SIGTERM, then drain every replica and leave Ray."""
    stop = threading.Event()
    try:
        start(args)
        for sig in (signal.SIGINT, signal.SIGTERM):  # after `ray.init`, which sets its own (exit at once)
            signal.signal(sig, lambda *_: stop.set())
        query = f"?token={args.token}" if args.token else ""
        replicas = args.replicas if args.min_replicas is None else f"{args.min_replicas}-{args.max_replicas}"
        print(
            f"streamgen serving on Ray Serve (replicas: {replicas}) on http://{args.host}:{args.port}/{query} "
            f"(websocket ws://{args.host}:{args.port}{WEBSOCKET_PATH})",
            flush=True,
        )
        stop.wait()
    finally:
        if ray.is_initialized():
            serve.delete(APP_NAME)  # stops the replicas while the controller runs: each drains its sessions
            serve.shutdown()
            ray.shutdown()
    print("streamgen serve: stopped", flush=True)
    return 0
