"""The serve suite's apps: the main one, on fake NeuronCores, and the arguments of side apps."""

from __future__ import annotations

import pytest

# The main app: 4 fake cores, 2 per replica → two pinned replicas running the torch backend.
MAIN_ARGS = {"backend": "torch", "cores_per_replica": 2, "max_batch_size": 4, "max_total_tokens": 256,
             "max_input_tokens": 128, "replica_cpus": 1}
# Side apps run CPU replicas (cores_per_replica 0), leaving the fake cores to the main app.
SIDE_ARGS = {"backend": "torch", "cores_per_replica": 0, "max_batch_size": 2, "max_total_tokens": 256,
             "max_input_tokens": 128, "replica_cpus": 1}


@pytest.fixture(scope="session")
def app(cluster) -> str:
    return cluster.deploy("main", MAIN_ARGS)
