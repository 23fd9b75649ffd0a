"""Ray Serve scale-out: the single-process app and engine as replicas behind one address.

This module decides how many replicas run and with what resources, and holds the entry
points; each replica (``service.ray_replica``) runs ``create_app(settings)`` unchanged.
Ray Serve's HTTP proxy spreads requests over the replicas and the autoscaler adds or
removes replicas on ongoing requests. Start it on a running cluster::

    serve run service.ray_app:build_app model=LARK-Lab/CodeScaler-8B ray_max_replicas=8
    python -m service.ray_app --model LARK-Lab/CodeScaler-8B --host 0.0.0.0 --ray-address auto

``build_app`` takes Settings field names (plus ``metrics_port`` and ``replica_cpus``);
CODESCALER_* variables apply where the app is built, and the parsed Settings travel to
every replica, so all replicas run one configuration.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import ray
from ray import serve
from ray.serve import Application

from service.cli import add_settings_flags, check_keys_or_exit, parse_settings, setup_logging, validated_or_exit
from service.ray_replica import CodeScalerReplica, RayOptions
from service.settings import Settings

log = logging.getLogger("codescaler.ray")

APP_NAME = "codescaler"
#: Seconds a client is told to wait when Serve's own request queue is full (503, like the engine's).
BACKPRESSURE_RETRY_AFTER_S = 1.0


def split_args(args: Mapping[str, object]) -> tuple[Settings, RayOptions]:
    """Settings (over CODESCALER_* variables) and RayOptions from one flat mapping of builder args."""
    ray_keys = set(RayOptions.model_fields)
    options = RayOptions(**{k: v for k, v in args.items() if k in ray_keys})
    settings = Settings(**{k: v for k, v in args.items() if k not in ray_keys})  # type: ignore[arg-type]
    return settings, options


def resolve_num_gpus(settings: Settings) -> float:
    """GPUs per replica: the setting, else 1 when the cluster (or, before Ray is connected, this machine) has GPUs.

    ``serve run`` builds the app before it connects to Ray, so the cluster cannot be asked
    then; a head node without GPUs would then choose CPU replicas. Production configs set
    ray_num_gpus explicitly (the RayService example does).
    """
    if settings.ray_num_gpus is not None:
        return settings.ray_num_gpus
    if ray.is_initialized():
        return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    import torch

    local = torch.cuda.device_count()
    log.warning("ray_num_gpus not set and Ray not connected yet: using this machine's GPUs (%d)", local)
    return 1.0 if local else 0.0


def replica_settings(settings: Settings, num_gpus: float) -> Settings:
    """A CPU replica must not pick up a GPU Ray did not give it (Ray leaves CUDA_VISIBLE_DEVICES alone at 0)."""
    if num_gpus == 0 and settings.device == "auto":
        return settings.model_copy(update={"device": "cpu"})
    return settings


def deployment_options(settings: Settings, num_gpus: float, replica_cpus: float) -> dict[str, Any]:
    """Serve deployment options derived from the settings, so one object configures both paths.

    - max_ongoing_requests = 2 x target: a replica at the autoscaler's target still has room
      for a burst, and its batcher sees enough concurrent items to fill batches (Serve's
      default of 5 would starve the batcher: trainers send one sample per request).
    - max_queued_requests = max_queue_items: waiting at the proxy is bounded as well; the
      excess gets 503 + Retry-After, the status trainers retry (never 429).
    - graceful_shutdown_timeout_s = request_timeout + forward_timeout: the engine answers every
      admitted item within that, so a replica being removed answers what it holds instead of
      cutting requests off after Serve's default 20 s (Serve has stopped routing to it first,
      which is what the single process's drain does for its load balancer).
    - min == max replicas: a fixed count; otherwise autoscaling on ongoing requests.
    """
    target = settings.ray_target_ongoing_requests
    options: dict[str, Any] = {
        "ray_actor_options": {"num_gpus": num_gpus, "num_cpus": replica_cpus},
        "max_ongoing_requests": max(1, math.ceil(2 * target)),
        "max_queued_requests": settings.max_queue_items,
        "backpressure_config": {"status_code": 503, "retry_after_s": BACKPRESSURE_RETRY_AFTER_S},
        "graceful_shutdown_timeout_s": settings.request_timeout + settings.forward_timeout,
    }
    if settings.ray_min_replicas == settings.ray_max_replicas:
        options["num_replicas"] = settings.ray_max_replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": settings.ray_min_replicas,
            "max_replicas": settings.ray_max_replicas,
            "target_ongoing_requests": target,
        }
    return options


def application(settings: Settings, options: RayOptions | None = None) -> Application:
    """The bound Serve application for ``settings`` (Ray connected or not; see resolve_num_gpus)."""
    options = options or RayOptions()
    num_gpus = resolve_num_gpus(settings)
    deployment = CodeScalerReplica.options(**deployment_options(settings, num_gpus, options.replica_cpus))
    return deployment.bind(replica_settings(settings, num_gpus), options)


def build_app(args: dict[str, str]) -> Application:
    """Builder for ``serve run service.ray_app:build_app key=value ...`` and RayService configs."""
    settings, options = split_args(args)
    return application(settings, options)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m service.ray_app``: connect to (or start) Ray, run the app, block until stopped.

    The Serve proxy listens on --host/--port (the same flags as the single process). On
    Ctrl-C or SIGTERM the application is deleted (its replicas finish what they hold) and a
    Ray instance started here is stopped; a second signal ends the process at once.
    """
    parser = argparse.ArgumentParser(prog="python -m service.ray_app",
                                     description="CodeScaler reward-model server on Ray Serve")
    add_settings_flags(parser)
    parser.add_argument("--ray-address", default=None,
                        help="Ray cluster to join ('auto', 'ray://host:10001', ...); default: RAY_ADDRESS, "
                        "a cluster running on this machine, or a new local instance.")
    for name, field in RayOptions.model_fields.items():
        parser.add_argument("--" + name.replace("_", "-"), default=argparse.SUPPRESS, help=field.description)
    values = vars(parser.parse_args(argv))
    address = values.pop("ray_address")
    ray_values = {k: values.pop(k) for k in list(values) if k in RayOptions.model_fields}
    settings = parse_settings(values)
    options = validated_or_exit(RayOptions, ray_values)
    setup_logging(settings)
    check_keys_or_exit(settings)  # a bad key file fails here, not through replica retries

    ray.init(address=address, namespace="serve")
    stop = threading.Event()

    def on_sigterm(*_: object) -> None:
        stop.set()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends a stuck shutdown

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(application(settings, options), name=APP_NAME, route_prefix="/")
        log.info("serving on http://%s:%d", settings.host, settings.port)
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete(APP_NAME)
        ray.shutdown()  # stops a Ray instance started here; only disconnects from a cluster


if __name__ == "__main__":
    main(sys.argv[1:])
