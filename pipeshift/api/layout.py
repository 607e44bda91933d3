"""A pipeline layout: which stage (on which pool) holds which contiguous range of layers.

`Layout.parse("3,3,2")` is the command-line shorthand: pool `local`, stage ids 0..n-1.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

DEFAULT_POOL = "local"


class LayoutError(ValueError):
    """A layout that does not describe a valid pipeline."""


@dataclass(frozen=True, order=True)
class StagePlan:
    """One stage: layers `start` (inclusive) to `end` (exclusive) on a pool."""

    stage_id: int
    pool: str
    start: int
    end: int

    @property
    def num_layers(self) -> int:
        return self.end - self.start

    def layers(self) -> range:
        return range(self.start, self.end)

    def to_json(self) -> dict[str, object]:
        return {"stage_id": self.stage_id, "pool": self.pool, "layers": [self.start, self.end]}


@dataclass(frozen=True)
class Layout:
    """An ordered list of stages that together cover layers 0..num_layers-1 exactly once."""

    stages: tuple[StagePlan, ...]

    def __post_init__(self) -> None:
        if not self.stages:
            raise LayoutError("a layout needs at least one stage")
        expected = 0
        ids: set[int] = set()
        for i, st in enumerate(self.stages):
            if st.start != expected:
                raise LayoutError(f"stage {i} starts at layer {st.start}, expected {expected} (no gaps or overlaps)")
            if st.end <= st.start:
                raise LayoutError(f"stage {i} has an empty layer range [{st.start}, {st.end})")
            if st.stage_id in ids:
                raise LayoutError(f"stage id {st.stage_id} is used twice")
            if not st.pool:
                raise LayoutError(f"stage {i} has an empty pool name")
            ids.add(st.stage_id)
            expected = st.end

    @classmethod
    def from_sizes(cls, sizes: list[int], pool: str = DEFAULT_POOL) -> Layout:
        stages, start = [], 0
        for i, n in enumerate(sizes):
            if n <= 0:
                raise LayoutError(f"stage {i} has {n} layers; every stage needs at least one")
            stages.append(StagePlan(i, pool, start, start + n))
            start += n
        return cls(tuple(stages))

    @classmethod
    def parse(cls, text: str, num_layers: int | None = None) -> Layout:
        """Parse the `3,3,2` shorthand; with `num_layers`, check that the sizes add up to it."""
        try:
            sizes = [int(part) for part in text.split(",")]
        except ValueError:
            raise LayoutError(f"layout {text!r} must be comma-separated layer counts such as 3,3,2") from None
        layout = cls.from_sizes(sizes)
        if num_layers is not None and layout.num_layers != num_layers:
            raise LayoutError(f"layout {text!r} covers {layout.num_layers} layers; the model has {num_layers}")
        return layout

    @classmethod
    def from_json(cls, data: dict) -> Layout:
        """Read `{"stages": [{"pool": P, "layers": [start, end], "stage_id"?: N}, ...]}`."""
        try:
            raw = data["stages"]
            stages = tuple(
                StagePlan(int(s.get("stage_id", i)), str(s.get("pool", DEFAULT_POOL)),
                          int(s["layers"][0]), int(s["layers"][1]))
                for i, s in enumerate(raw)
            )
        except (KeyError, TypeError, IndexError, ValueError) as e:
            raise LayoutError(f"layout JSON needs stages[].layers = [start, end]: {e}") from None
        return cls(stages)

    def to_json(self) -> dict[str, object]:
        return {"stages": [s.to_json() for s in self.stages]}

    @property
    def num_layers(self) -> int:
        return self.stages[-1].end

    @property
    def sizes(self) -> list[int]:
        return [s.num_layers for s in self.stages]

    def __iter__(self) -> Iterator[StagePlan]:
        return iter(self.stages)

    def __len__(self) -> int:
        return len(self.stages)

    def stage(self, stage_id: int) -> StagePlan:
        for s in self.stages:
            if s.stage_id == stage_id:
                return s
        raise KeyError(f"no stage with id {stage_id}")

    def owner(self, layer: int) -> StagePlan:
        for s in self.stages:
            if s.start <= layer < s.end:
                return s
        raise KeyError(f"layer {layer} is outside the layout (0..{self.num_layers - 1})")

    def short(self) -> str:
        return ",".join(str(n) for n in self.sizes)
