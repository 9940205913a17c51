"""TGI's launcher arguments as TGI's variables: `docker run IMAGE --model-id org/m --max-batch-size 4`.

neuronx-tgi's image takes the launcher's arguments after the image name; ours starts Ray and `serve
run` instead of the launcher, and reads the same settings from TGI's environment variables
(`neuron_serve.config.ENV_NAMES`). The container's entrypoint runs this module on its arguments and
evaluates what it prints: one `export NAME='value'` per argument. An argument with no variable here is
refused, so that nothing a user asked for is silently dropped.

    python -m neuron_serve.launcher --model-id org/m --max-input-length=1024
"""

from __future__ import annotations

import shlex
import sys

from .config import ENV_NAMES

# The app's settings, and the API's port, which the container gives `serve run` (deployments/http_port.py).
VARIABLES = {name for names in ENV_NAMES.values() for name in names} | {"PORT"}


def launcher_env(argv: list[str]) -> dict[str, str]:
    """`--max-batch-size 4` or `--max-batch-size=4` -> {"MAX_BATCH_SIZE": "4"}; ValueError for anything else."""
    env: dict[str, str] = {}
    args = list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}: arguments are `--name value`, as TGI's launcher takes them")
        flag, has_value, value = arg[2:].partition("=")
        name = flag.upper().replace("-", "_")
        if name not in VARIABLES:
            known = ", ".join(sorted("--" + v.lower().replace("_", "-") for v in VARIABLES))
            raise ValueError(f"--{flag} is not a setting of neuron-serve (it takes: {known})")
        if not has_value:
            if not args:
                raise ValueError(f"--{flag} needs a value")
            value = args.pop(0)
        env[name] = value
    return env


def main(argv: list[str]) -> int:
    try:
        env = launcher_env(argv)
    except ValueError as e:
        print(f"neuron-serve: {e}", file=sys.stderr)
        return 2
    for name, value in env.items():
        print(f"export {name}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
