"""The GPU catalogue and `pools.yaml`: datasheet defaults, per-pool overrides, and what is rejected."""

from __future__ import annotations

import re

import pytest

from pipeshift.errors import UserError
from pipeshift.placement import CATALOGUE, parse_pools


def test_the_catalogue_has_the_common_gpus_and_a_cpu() -> None:
    expected = {"a100-40gb", "a100-80gb", "h100-80gb", "h200", "l40s", "l4", "a10g", "rtx4090", "rtx5090", "cpu"}
    assert expected <= set(CATALOGUE)
    assert CATALOGUE["h200"].memory_gb > CATALOGUE["h100-80gb"].memory_gb > CATALOGUE["l40s"].memory_gb
    assert CATALOGUE["h100-80gb"].tflops > CATALOGUE["a100-80gb"].tflops > CATALOGUE["cpu"].tflops


def test_overrides_replace_datasheet_numbers_and_the_rest_stay() -> None:
    (pool,) = parse_pools({"pools": [{"name": "edge", "gpu": "rtx4090", "count": 3, "memory_gb": 20,
                                      "cost_per_hour": 0.25, "available": 2}]})
    spec = CATALOGUE["rtx4090"]
    assert (pool.memory_gb, pool.cost_per_hour, pool.usable) == (20.0, 0.25, 2)
    assert (pool.tflops, pool.bandwidth_gbps) == (spec.tflops, spec.bandwidth_gbps)


@pytest.mark.parametrize(("data", "message"), [
    ({"pools": [{"name": "a", "gpu": "l4", "count": 1}, {"name": "a", "gpu": "l4", "count": 2}]},
     "a appear more than once"),
    ({"pools": [{"name": "a", "gpu": "l4", "count": 1, "available": 2}]}, "available (2) cannot exceed count (1)"),
    ({"pools": [{"name": "a", "gpu": "l4"}]}, "pools.0.count: required but missing"),
    ({"pool": []}, "unknown key 'pool'; valid keys here: pools"),
])
def test_bad_entries_are_rejected_with_the_path(data: dict, message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        parse_pools(data, source="pools.yaml")
