"""GPU pools the planner may place stages on, read from `pools.yaml` and resolved against the catalogue.

`pools: [{name: NAME, gpu: CATALOGUE_NAME, count: N}, ...]`, each entry optionally overriding
`memory_gb`, `tflops`, `bandwidth_gbps` (memory bandwidth, GB/s), `cost_per_hour`,
`interconnect_gbps` (GB/s to other pools), `intra_gbps` (GB/s between devices of the pool) and
`available` (how many of `count` can be used now; spot capacity or maintenance make it smaller).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeshift.errors import UserError
from pipeshift.placement.catalogue import CATALOGUE, lookup
from pipeshift.placement.input_errors import explain


@dataclass(frozen=True)
class Pool:
    """A pool after catalogue defaults and overrides are applied; the unit the planner works with."""

    name: str
    gpu: str
    count: int
    memory_gb: float
    tflops: float
    bandwidth_gbps: float
    intra_gbps: float
    interconnect_gbps: float
    cost_per_hour: float
    available: int

    @property
    def usable(self) -> int:
        return min(self.count, self.available)

    @property
    def link_gbps(self) -> float:
        """Devices of one pool can always fall back to the network path, so never slower than it."""
        return max(self.intra_gbps, self.interconnect_gbps)


class PoolEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    gpu: str
    count: int = Field(ge=1)
    available: int | None = Field(default=None, ge=0)
    memory_gb: float | None = Field(default=None, gt=0)
    tflops: float | None = Field(default=None, gt=0)
    bandwidth_gbps: float | None = Field(default=None, gt=0)
    intra_gbps: float | None = Field(default=None, gt=0)
    interconnect_gbps: float | None = Field(default=None, gt=0)
    cost_per_hour: float | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> PoolEntry:
        if self.gpu not in CATALOGUE:
            raise ValueError(f"gpu {self.gpu!r} is not in the catalogue; use one of {', '.join(CATALOGUE)}")
        if self.available is not None and self.available > self.count:
            raise ValueError(f"available ({self.available}) cannot exceed count ({self.count})")
        return self

    def resolve(self) -> Pool:
        spec = lookup(self.gpu)

        def pick(value: float | None, default: float) -> float:
            return float(default if value is None else value)

        return Pool(name=self.name, gpu=self.gpu, count=self.count,
                    memory_gb=pick(self.memory_gb, spec.memory_gb), tflops=pick(self.tflops, spec.tflops),
                    bandwidth_gbps=pick(self.bandwidth_gbps, spec.bandwidth_gbps),
                    intra_gbps=pick(self.intra_gbps, spec.intra_gbps),
                    interconnect_gbps=pick(self.interconnect_gbps, spec.interconnect_gbps),
                    cost_per_hour=pick(self.cost_per_hour, spec.cost_per_hour),
                    available=self.count if self.available is None else self.available)


class PoolsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pools: list[PoolEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> PoolsFile:
        names = [p.name for p in self.pools]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"pool names must be unique; {', '.join(twice)} appear more than once")
        return self


def make_pool(name: str, gpu: str, count: int, **overrides: float | int) -> Pool:
    """A pool from code (tests, benchmarks), validated like a `pools.yaml` entry."""
    return PoolEntry(name=name, gpu=gpu, count=count, **overrides).resolve()


def load_pools(path: Path) -> tuple[Pool, ...]:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: not found (a pools file lists `pools: [{{name, gpu, count}}, ...]`)") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {e}") from None
    return parse_pools(data, source=str(path))


def parse_pools(data: object, source: str = "pools") -> tuple[Pool, ...]:
    try:
        parsed = PoolsFile.model_validate(data)
    except ValidationError as e:
        raise UserError(explain(e, PoolsFile, source)) from None
    return tuple(entry.resolve() for entry in parsed.pools)


def describe(pools: Sequence[Pool]) -> str:
    return ", ".join(f"{p.name} ({p.usable}x {p.gpu}, {p.memory_gb:g} GB)" for p in pools)
