"""Stop Serve without cutting a stream: delete every application gracefully, then shut Serve down.

    python -m deployments.drain [--address auto]

Deleting an application stops routing new requests to it (they get 404 at once, or a 503 within a
second from an ingress replica HAProxy reached before it heard; see ingress.BatcherSource) while its
replicas finish what they are serving, up to `graceful_shutdown_timeout_s`; the HTTP proxies stay
up meanwhile, so in-flight streams reach their clients. `serve shutdown`, and Ctrl-C on `serve
run`, stop the proxies first and cut them. The container runs this on SIGTERM
(`scripts/container_start.sh`).
"""

from __future__ import annotations

import argparse
import logging
import time

logger = logging.getLogger("ray.serve")

DRAIN_POLL_S = 0.5


def drain(apps: list[str] | None = None, shutdown: bool = True) -> None:
    """Delete `apps` (all when None), each waiting for its in-flight requests, then shut Serve down."""
    from ray import serve

    names = list(serve.status().applications) if apps is None else apps
    started = time.monotonic()
    for name in names:  # all at once: each app's replicas finish their requests in parallel
        serve.delete(name, _blocking=False)
    # As long as it takes: `serve.delete` itself gives up after 60 s, and would cut a longer
    # `graceful_shutdown_timeout_s`. Kubernetes' grace period (or Docker's stop timeout) bounds the wait.
    while set(names) & set(serve.status().applications):
        time.sleep(DRAIN_POLL_S)
    logger.info("drained %s in %.1fs", ", ".join(names) or "no application", time.monotonic() - started)
    if shutdown:
        serve.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="auto", help="the Ray cluster (default: the one on this node)")
    args = parser.parse_args(argv)
    import ray

    ray.init(address=args.address, logging_level="ERROR")
    drain()


if __name__ == "__main__":
    main()
