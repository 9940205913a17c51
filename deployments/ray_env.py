"""Ray Serve's own throughput settings, in one place (no Ray import).

Every Serve process of the app runs with SERVE_ENV. Measured on the tiny model, `serve run` at 8
streams, 2-core CPU (scripts/bench.py --url):
- user code and the handle's router on the replica's event loop (no thread hop per streamed item):
  166 vs 142 tokens/s;
- every Serve hop (proxy -> ingress -> batcher) over gRPC instead of Ray actor calls and the object
  store: 247, 250, 253 vs 181, 193, 182 tokens/s, alternating runs; p50 TTFT of one stream 81 vs 90 ms;
- the proxy's router on the proxy's event loop too: the proxy's CPU per streamed token 0.54 and 0.66
  vs 0.75 and 0.81 ms, alternating runs.

Two routes carry them, because Serve starts its processes two ways:
- the app puts SERVE_ENV in its replicas' runtime_env (deployments/app.py), whatever config runs it;
- the controller and the proxies are Ray's, started before the app: serve_config.yaml gives them the
  same variables as `controller_options.runtime_env.env_vars` (the controller passes its runtime_env
  on to the proxies it starts). `serve run`, KubeRay's serveConfigV2 and the test and benchmark
  clusters all start Serve from that block; tests/scripts/test_ray_env.py keeps it equal to SERVE_ENV.
"""

SERVE_ENV = {
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
}
