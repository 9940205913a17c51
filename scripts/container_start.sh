#!/bin/sh
# The container's entrypoint: Ray (metrics on 8080, dashboard on 8265), then `serve run serve_config.yaml`
# with the API on TGI's PORT (80, as in TGI's images: `docker run -p 8080:80 ...`).
# Arguments are TGI launcher's, as neuronx-tgi's image takes them (`IMAGE --model-id org/m
# --max-batch-size 4`): each becomes its TGI variable, which overrides serve_config.yaml's args.
# SIGTERM (docker stop, a pod's termination) drains first: every application is deleted gracefully, so
# in-flight requests finish (up to graceful_shutdown_timeout_s) before Serve and Ray stop. Give the
# container a stop timeout above that (`docker stop -t 60`, terminationGracePeriodSeconds).
set -e
if [ "$#" -gt 0 ]; then
    exports=$(python -m neuron_serve.launcher "$@")
    eval "$exports"
fi
config=serve_config.yaml
if [ -n "$PORT" ]; then  # the image sets 80; `--port` or `-e PORT` another
    config="${TMPDIR:-/tmp}/serve_config.yaml"
    python -m deployments.http_port "$PORT" serve_config.yaml > "$config"
    echo "$PORT" > "${TMPDIR:-/tmp}/neuron-serve.port"  # for the image's HEALTHCHECK
fi
ray start --head --dashboard-host=0.0.0.0 --metrics-export-port=8080 --disable-usage-stats
serve run "$config" &
serve_pid=$!
# TERM, not INT: sh starts a background job with SIGINT ignored, and `serve run` would keep waiting.
trap 'python -m deployments.drain || true; kill -TERM "$serve_pid" 2>/dev/null || true' TERM INT
wait "$serve_pid" || true
wait "$serve_pid" 2>/dev/null || true
ray stop
