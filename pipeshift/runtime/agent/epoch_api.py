"""The agent's control routes of the epoch switch: `POST /reconfig/arm`, `/reconfig/flush`, `/reconfig/retire`
(bodies checked here, state changes in `epoch`); idempotent per request id like every control call."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from pipeshift.runtime.agent.idempotency import Answer

if TYPE_CHECKING:
    from pipeshift.runtime.agent.control import ControlAPI

Count = Annotated[StrictInt, Field(ge=0)]
LayerRange = Annotated[list[Count], Field(min_length=2, max_length=2)]
Id = Annotated[StrictStr, Field(min_length=1, max_length=128)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    request_id: Id
    reconfig_id: Id


class ArmBody(_Body):
    """`old_layers`/`layers`: the stage's range in epoch E / E+1 (null: it does not serve that epoch);
    `downstream`: its E+1 route; `pushes`: target data address → moving layers it owes that target;
    `sequences`: live sequences (id → reserved tokens) a target reserves for if it has not yet."""

    epoch: Count
    old_layers: LayerRange | None
    layers: LayerRange | None
    downstream: StrictStr | None = None
    pushes: dict[StrictStr, list[Count]] = Field(default_factory=dict)
    sequences: dict[StrictStr, Count] = Field(default_factory=dict)
    resize: StrictBool = True


class FlushBody(_Body):
    timeout_s: Annotated[float, Field(gt=0, le=600)] = 60.0


class RetireBody(_Body):
    """`sequences`: the ids running when the frontend armed (the rest that only the change reserved here
    finished meanwhile)."""

    epoch: Count
    sequences: list[Count] = Field(default_factory=list)


def _range(layers: list[int] | None) -> tuple[int, int] | None:
    if layers is None:
        return None
    if layers[0] >= layers[1]:
        raise ValueError(f"a layer range [start, end) needs start < end, got {layers}")
    return layers[0], layers[1]


def seq_ids(sequences: dict[str, int]) -> dict[int, int]:
    """A body's `sequences` map keyed by sequence id (JSON object keys are strings); a bad key names the field."""
    try:
        return {int(seq): tokens for seq, tokens in sequences.items()}
    except ValueError:
        raise ValueError(f"field 'sequences': keys must be sequence ids (integers), got {sorted(sequences)}") from None


async def arm(api: ControlAPI, body: ArmBody) -> Answer:
    answer = await api.reconfig.arm(
        body.reconfig_id, body.epoch, _range(body.old_layers), _range(body.layers), body.downstream,
        {target: tuple(layers) for target, layers in body.pushes.items()}, seq_ids(body.sequences), body.resize,
    )  # fmt: skip
    return 200, answer


async def flush(api: ControlAPI, body: FlushBody) -> Answer:
    return 200, await api.reconfig.flush(body.reconfig_id, body.timeout_s)


async def retire(api: ControlAPI, body: RetireBody) -> Answer:
    return 200, await api.reconfig.retire(body.reconfig_id, body.epoch, body.sequences)
