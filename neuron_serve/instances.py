"""The AWS instance types with Neuron devices, in one table: devices, NeuronCores, HBM, host size.

The capacity planner (`scripts/plan.py`) sizes core groups against it and the KubeRay renderer
(`scripts/render_kuberay.py`) sizes worker pods with it, so the two always agree. Every device
(an Inferentia2 or Trainium1 chip) has 2 NeuronCore-v2 and 32 GiB of HBM, 16 GiB per core.
"""

from __future__ import annotations

from dataclasses import dataclass

CORES_PER_DEVICE = 2
HBM_GIB_PER_CORE = 16.0


@dataclass(frozen=True)
class InstanceType:
    name: str
    devices: int  # Neuron devices: what the Neuron device plugin counts as `aws.amazon.com/neuron`
    vcpus: int
    memory_gib: int  # host memory

    @property
    def cores(self) -> int:
        """NeuronCores: what Ray counts as `neuron_cores`."""
        return self.devices * CORES_PER_DEVICE

    @property
    def hbm_gib_per_core(self) -> float:
        return HBM_GIB_PER_CORE


INSTANCE_TYPES: dict[str, InstanceType] = {
    t.name: t
    for t in (
        InstanceType("inf2.xlarge", devices=1, vcpus=4, memory_gib=16),
        InstanceType("inf2.8xlarge", devices=1, vcpus=32, memory_gib=128),
        InstanceType("inf2.24xlarge", devices=6, vcpus=96, memory_gib=384),
        InstanceType("inf2.48xlarge", devices=12, vcpus=192, memory_gib=768),
        InstanceType("trn1.2xlarge", devices=1, vcpus=8, memory_gib=32),
        InstanceType("trn1.32xlarge", devices=16, vcpus=128, memory_gib=512),
    )
}


def lookup(name: str) -> InstanceType:
    """The instance type called `name`; a ValueError naming the known ones otherwise."""
    try:
        return INSTANCE_TYPES[name]
    except KeyError:
        raise ValueError(f"unknown instance type {name!r}; known: {', '.join(INSTANCE_TYPES)}") from None
