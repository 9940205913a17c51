"""serve_config.yaml listening on another port: the container's API port is TGI's `PORT` (80 in TGI's images).

`serve run` takes the HTTP port from the config file only, so the container's entrypoint runs `serve run`
on a copy with `http_options.port` replaced:

    python -m deployments.http_port 80 serve_config.yaml > /tmp/serve_config.yaml
"""

from __future__ import annotations

import sys

import yaml


def on_port(config_text: str, port: str) -> str:
    """The config with Serve's HTTP proxies on `port`; ValueError when it is not a TCP port."""
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"PORT must be a TCP port (1-65535), got {port!r}")
    config = yaml.safe_load(config_text)
    config["http_options"] = {**config.get("http_options", {}), "port": int(port)}
    return yaml.safe_dump(config, sort_keys=False)


def main(argv: list[str]) -> int:
    port, path = argv
    try:
        sys.stdout.write(on_port(open(path).read(), port))
    except ValueError as e:
        print(f"neuron-serve: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
