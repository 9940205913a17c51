"""Placement: one NeuronBatcher replica per NeuronCore group, each pinned by Ray, requests spread over both."""

from __future__ import annotations

import asyncio

import httpx


def test_two_replicas_each_pinned_to_its_own_cores_and_both_serve(app):
    info = httpx.get(f"{app}/info", timeout=30).json()
    cores = sorted(r["neuron_cores"] for r in info["replicas"])
    # Read inside each replica from NEURON_RT_VISIBLE_CORES, which Ray set from the neuron_cores it gave.
    assert cores == ["0,1", "2,3"]
    before = {r["replica"]: r["served"] for r in info["replicas"]}

    async def burst():
        async with httpx.AsyncClient(timeout=120) as client:
            body = {"inputs": "Hello", "parameters": {"max_new_tokens": 8}}
            responses = await asyncio.gather(*(client.post(f"{app}/generate", json=body) for _ in range(16)))
        assert all(r.status_code == 200 for r in responses)

    asyncio.run(burst())
    after = {r["replica"]: r["served"] for r in httpx.get(f"{app}/info", timeout=30).json()["replicas"]}
    assert sum(after.values()) - sum(before.values()) >= 16
    assert all(after[r] > before[r] for r in before), (before, after)


def test_the_layout_is_decided_in_the_builder():
    from deployments.app import plan_layout
    from neuron_serve.config import Config

    on_cores = plan_layout(Config(cores_per_replica=2), 4.0)
    assert (on_cores.backend, on_cores.neuron_cores, on_cores.num_replicas) == ("neuron", 2, 2)
    laptop = plan_layout(Config(cores_per_replica=2), 0.0)
    assert (laptop.backend, laptop.neuron_cores, laptop.num_replicas) == ("torch", 0, 1)
    assert "no group of 2 neuron_cores" in laptop.reason
    explicit = plan_layout(Config(backend="neuron", cores_per_replica=8, num_replicas=3), 0.0)
    assert (explicit.backend, explicit.neuron_cores, explicit.num_replicas) == ("neuron", 8, 3)
    scaled = plan_layout(Config(cores_per_replica=2, autoscaling_config={"min_replicas": 1, "max_replicas": 12}), 24.0)
    assert scaled.num_replicas is None and "autoscaling" in scaled.reason
    cpu = plan_layout(Config(backend="torch", cores_per_replica=0), 4.0)
    assert (cpu.backend, cpu.neuron_cores) == ("torch", 0)
