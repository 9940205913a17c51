# neuron-serve for AWS Inferentia2 / Trainium1: `docker run --device=/dev/neuron0 -p 8080:80 -v data:/data IMAGE`.
#
# Base: AWS's Neuron deep-learning container for PyTorch inference, Neuron SDK 2.26.1 on Ubuntu 22.04,
# Python 3.11: torch 2.8 with torch-neuronx 2.8.0.2.10, neuronx-cc 2.21, neuronx-distributed 0.15, the
# Neuron runtime and collectives, and aws-neuronx-tools (neuron-ls, neuron-top) in /opt/aws/neuron/bin.
# These are the versions optimum-neuron 0.4.5's `neuronx` extra pins.
FROM public.ecr.aws/neuron/pytorch-inference-neuronx:2.8.0-neuronx-py311-sdk2.26.1-ubuntu22.04

WORKDIR /app
COPY pyproject.toml README.md serve_config.yaml ./
COPY neuron_serve ./neuron_serve
COPY deployments ./deployments
COPY scripts/container_start.sh ./scripts/
# The `neuron` extra, from AWS's package index; torch is the base image's Neuron build (not the Makefile's CPU pin).
RUN pip install --no-cache-dir '.[neuron]' --extra-index-url https://pip.repos.neuron.amazonaws.com

# neuron-ls on PATH: Ray runs it to count the NeuronCores it offers as `neuron_cores`.
# /data holds hub downloads (HF_HOME), the Neuron compiler's cache and compiled models (neuron-serve's
# cache, $XDG_CACHE_HOME/neuron-serve): mount a volume there so a restart does not recompile.
# Hub downloads directly under /data, as neuronx-tgi keeps them: its volumes serve here as they are.
ENV PATH=/opt/aws/neuron/bin:$PATH \
    HF_HOME=/data \
    HF_HUB_CACHE=/data \
    XDG_CACHE_HOME=/data \
    NEURON_COMPILE_CACHE_URL=/data/neuron-compile-cache \
    PYTHONUNBUFFERED=1 \
    PORT=80
VOLUME /data

# 80: the TGI API (Serve's HTTP proxy on PORT, as TGI's images: `docker run -p 8080:80`); 8265: Ray dashboard;
# 8080: Ray's Prometheus metrics.
EXPOSE 80 8265 8080

# The base image's entrypoint and health check start TorchServe: replace them.
HEALTHCHECK --start-period=30m CMD curl -fs "http://localhost:$(cat "${TMPDIR:-/tmp}/neuron-serve.port")/health" || exit 1
# Ray with its metrics on 8080, then the app; SIGTERM drains in-flight requests first (see the script).
# TGI variables (MODEL_ID, HF_TOKEN, MAX_BATCH_SIZE, HF_NUM_CORES, ...) and, as with neuronx-tgi, TGI
# launcher arguments after the image name (--model-id, --max-batch-size, ...) override serve_config.yaml's
# args. On KubeRay the pod's command replaces the entrypoint.
STOPSIGNAL SIGTERM
ENTRYPOINT ["scripts/container_start.sh"]
CMD []
