"""The frontend's side of a drain-free layout switch: arm the next epoch, wait for the old one to retire,
settle admission on the new stages.

`arm` is the point of no return of an epoch switch: from its critical section on, every micro-batch the
frontend builds carries epoch E+1 and goes to the E+1 chain, so a sequence moves to the new layout at its
next step while batches of epoch E finish on the old chain. Everything that may fail or wait (reading the
new stages, dialling a new first stage) happens before that section, which starts no I/O; its length is
the only time the frontend cannot start a micro-batch (`paused_ms`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from pipeshift.runtime.frontend.admission import StageBudget
from pipeshift.runtime.frontend.scheduler import Gate, Scheduler, SwitchError
from pipeshift.runtime.frontend.stages import AgentClient, DataPlane, StageInfo

if TYPE_CHECKING:
    import aiohttp

    from pipeshift.runtime.frontend.config import FrontendConfig
    from pipeshift.runtime.metrics import FrontendMetrics

logger = logging.getLogger(__name__)
RETIRE_POLL_S = 0.05


def budgets(infos: list[StageInfo]) -> tuple[list[StageBudget], list[dict[int, int]]]:
    """Admission budgets as the stages report them, each with its stage's reservations. An armed stage has
    two: now (the union of its layers, in the pool it has) and after the old epoch retires (its new layers,
    in the pool it resizes to); a request is admitted only if it fits both, so new requests keep being
    admitted while the switch is armed without over-filling the pool a stage shrinks to."""
    out: list[StageBudget] = []
    held: list[dict[int, int]] = []
    for i in infos:
        out.append(StageBudget(i.stage_id, i.admission_layers, i.block_size, i.admission_blocks))
        held.append(i.reservations)
        if (i.after_layers, i.after_blocks) != (i.admission_layers, i.admission_blocks):
            # Sequences it holds that the frontend does not know count with the union's blocks: an overcount.
            out.append(StageBudget(i.stage_id, i.after_layers, i.block_size, i.after_blocks))
            held.append(i.reservations)
    return out, held


class EpochSwitching:
    """Mixed into `Frontend`; the attributes below are the frontend's."""

    config: FrontendConfig
    metrics: FrontendMetrics
    scheduler: Scheduler
    stages: list[str]
    stage_up: list[bool]
    infos: list[StageInfo]
    _agents: list[AgentClient]
    _data: DataPlane | None
    _session: aiohttp.ClientSession | None

    def _epoch_state_init(self) -> None:
        self._retired = asyncio.Event()
        self._armed_at: float | None = None

    def _check_stages(self) -> None:  # provided by Frontend
        raise NotImplementedError

    async def arm(self, stages: list[str], epoch: int) -> dict[str, Any]:
        """Build epoch `epoch` batches for the chain `stages` (control addresses, each agent already armed
        with its new range and route) from now on. Arming the epoch already served answers again."""
        s = self.scheduler
        if s.epoch == epoch and self.stages == list(stages):
            return self._armed_answer(0.0, already=True)
        if s.down_reason is not None:
            raise SwitchError(f"cannot arm epoch {epoch}: the pipeline is down ({s.down_reason})")
        if s.gate is not Gate.OPEN:
            raise SwitchError(f"cannot arm epoch {epoch} while the gate is {s.gate.value} (a drain is running)")
        if epoch <= s.epoch:
            raise SwitchError(f"cannot arm epoch {epoch}: epoch {s.epoch} is already served")
        if s.old_in_flight():
            raise SwitchError(f"epoch {s.epoch - 1} still has {s.old_in_flight()} batches in flight")
        assert self._session is not None and self._data is not None
        agents = [AgentClient(self._session, a, self.config.control_token) for a in stages]
        s.watch()
        infos = list(await asyncio.gather(*(a.info(armed=True) for a in agents)))
        old = (self.stages, self._agents, self.infos)
        self.stages, self._agents, self.infos = list(stages), agents, infos
        try:
            self._check_stages()
        except BaseException:
            self.stages, self._agents, self.infos = old
            raise
        first, old_first = infos[0], old[2][0]
        if first.data_address != old_first.data_address:
            await self._data.redial(first.data_host, first.data_port)
        # The critical section: no await from here to the end, so no batch can be built half-way through.
        started = time.perf_counter()
        self._retired.clear()
        s.rebuild_mirror(*budgets(infos))
        s.arm(epoch, s.mirror)
        paused_s = time.perf_counter() - started
        self._armed_at = time.monotonic()
        self.stage_up = [True] * len(infos)
        for i in range(len(infos)):
            self.metrics.stage_up.labels(str(i)).set(1)
        logger.info("armed epoch %d on %d stages; %d old batches in flight", epoch, len(infos), s.old_in_flight())
        return self._armed_answer(paused_s * 1e3)

    def _armed_answer(self, paused_ms: float, already: bool = False) -> dict[str, Any]:
        s = self.scheduler
        return {
            "armed": True,
            "already": already,
            "epoch": s.epoch,
            "paused_ms": paused_ms,
            "old_in_flight": s.old_in_flight(),
            "sequences": sorted(s.live_sequences()),
            "stages": list(self.stages),
        }

    async def retired(self, epoch: int, timeout_s: float) -> dict[str, Any]:
        """Answer once no batch of an epoch before `epoch` is in flight (the old epoch has retired)."""
        s = self.scheduler
        if s.epoch < epoch:
            raise SwitchError(f"epoch {epoch} is not armed (the frontend builds epoch {s.epoch})")
        deadline = time.monotonic() + timeout_s
        while s.old_in_flight():
            if time.monotonic() > deadline:
                raise SwitchError(f"{s.old_in_flight()} batches of the old epoch still in flight after {timeout_s}s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._retired.wait(), RETIRE_POLL_S)
        since = time.monotonic() - self._armed_at if self._armed_at is not None else 0.0
        return {"retired": True, "epoch": s.epoch, "since_arm_ms": since * 1e3}

    async def settle(self) -> dict[str, Any]:
        """Re-read the stages once they retired the old epoch (layers dropped, pools resized) and admit
        against what they hold now."""
        self.scheduler.watch()
        infos = list(await asyncio.gather(*(a.info() for a in self._agents)))
        old = self.infos
        self.infos = infos
        try:
            self._check_stages()
        except BaseException:
            self.infos = old
            raise
        self.scheduler.rebuild_mirror(*budgets(infos))
        self.scheduler.pump()
        s = self.scheduler
        return {"settled": True, "epoch": s.epoch, "reserved_blocks": s.mirror.reserved_blocks}
