"""Datasheet numbers of common accelerators, the defaults a `pools.yaml` entry starts from.

Units: memory in GB (1e9 bytes), dense fp16/bf16 tensor TFLOP/s without sparsity, memory and link
bandwidth in GB/s (bytes, one direction). Prices are indicative on-demand $/GPU-hour; set
`cost_per_hour` per pool for real ones. `cpu` is a local run's host: small, slow, nearly free.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_gb: float
    tflops: float
    bandwidth_gbps: float
    intra_gbps: float
    interconnect_gbps: float
    cost_per_hour: float


CATALOGUE: dict[str, GpuSpec] = {s.name: s for s in (
    # NVLink 3 (600 GB/s both ways) inside a node; 200 Gb/s networking between nodes.
    GpuSpec("a100-40gb", 40, 312, 1555, 300, 25, 2.50),
    GpuSpec("a100-80gb", 80, 312, 2039, 300, 25, 3.20),
    # NVLink 4 (900 GB/s both ways); 400 Gb/s networking.
    GpuSpec("h100-80gb", 80, 989, 3350, 450, 50, 4.50),
    GpuSpec("h200", 141, 989, 4800, 450, 50, 5.50),
    # PCIe cards: peer traffic over PCIe Gen4 x16 (Gen5 for the 5090), Ethernet between hosts.
    GpuSpec("l40s", 48, 362, 864, 25, 12.5, 1.40),
    GpuSpec("l4", 24, 121, 300, 25, 6.25, 0.70),
    GpuSpec("a10g", 24, 70, 600, 25, 6.25, 1.00),
    GpuSpec("rtx4090", 24, 165, 1008, 25, 3.125, 0.60),
    GpuSpec("rtx5090", 32, 209, 1792, 50, 3.125, 0.90),
    GpuSpec("cpu", 32, 1.0, 50, 10, 10, 0.05),
)}


def lookup(name: str) -> GpuSpec:
    try:
        return CATALOGUE[name]
    except KeyError:
        raise KeyError(f"unknown GPU {name!r}; the catalogue has {', '.join(CATALOGUE)}") from None
