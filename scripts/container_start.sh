#!/bin/sh
# The container's entrypoint: Ray (metrics on 8080, dashboard on 8265), then `serve run serve_config.yaml`.
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
ray start --head --dashboard-host=0.0.0.0 --metrics-export-port=8080 --disable-usage-stats
serve run serve_config.yaml &
serve_pid=$!
# TERM, not INT: sh starts a background job with SIGINT ignored, and `serve run` would keep waiting.
trap 'python -m deployments.drain || true; kill -TERM "$serve_pid" 2>/dev/null || true' TERM INT
wait "$serve_pid" || true
wait "$serve_pid" 2>/dev/null || true
ray stop
