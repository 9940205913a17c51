"""Ray Serve's own throughput settings, in one place (no Ray import: read before Ray starts).

Measured on the tiny model, `serve run` at 8 streams, 2-core CPU (scripts/bench.py --url):
- REPLICA_ENV, user code and the handle's router on the replica's event loop (no thread hop per
  streamed item): 166 vs 142 tokens/s.
- CLUSTER_ENV, every Serve hop over gRPC (proxy -> ingress -> batcher) instead of Ray actor calls
  and the object store: 247, 250, 253 vs 181, 193, 182 tokens/s, alternating runs; p50 TTFT of one
  stream 81 vs 90 ms.

The app puts both in its replicas' runtime_env, so any `serve run serve_config.yaml` calls its
batchers over gRPC. The proxy is Ray's, started before the app: CLUSTER_ENV must be in the
environment of whatever starts Ray: the Makefile and the Dockerfile (so the container and KubeRay
pods) repeat it, checked by tests/scripts/test_ray_env.py; the test cluster and the benchmark
call `use_cluster_env()`.
"""

import os

REPLICA_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
}

CLUSTER_ENV = {
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
}


def use_cluster_env() -> None:
    """Put CLUSTER_ENV in this process's environment where unset, so the Ray it starts runs as `make serve`'s."""
    for name, value in CLUSTER_ENV.items():
        os.environ.setdefault(name, value)
