"""Wires the frontend together: stage discovery and routing, the data plane, the scheduler, the HTTP API,
and the watchdogs that turn a dead or stuck stage into clear errors instead of hanging requests.

`start_frontend(config)` returns a running `Frontend` (its `port` bound); `await frontend.stop()` ends it.
`hold()` and `resume(stages, epoch, reprefill)` are the drain switch a layout change may run between;
`arm(stages, epoch)`, `retired(epoch)` and `settle()` (see `epoch_switch`) the drain-free epoch switch.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from typing import Any

import aiohttp
from aiohttp import web

from pipeshift.errors import UserError
from pipeshift.runtime.frontend.admission import KVMirror, StageBudget
from pipeshift.runtime.frontend.config import FrontendConfig
from pipeshift.runtime.frontend.epoch_switch import EpochSwitching, budgets
from pipeshift.runtime.frontend.openai_api import build_app
from pipeshift.runtime.frontend.recovery import StageRecovery
from pipeshift.runtime.frontend.scheduler import Gate, Scheduler, SchedulerConfig, SwitchError
from pipeshift.runtime.frontend.served_model import ServedModel
from pipeshift.runtime.frontend.stages import AgentClient, DataPlane, StageInfo, StageUnreachable
from pipeshift.runtime.frontend.zero import ZERO_REASON, ZeroStages
from pipeshift.runtime.metrics import FrontendMetrics
from pipeshift.runtime.microbatch import MicroBatch

logger = logging.getLogger(__name__)

# Health probes must answer quickly: a stage that takes longer than this is reported down.
HEALTH_TIMEOUT_S = 1.0
# While the pipeline is down, stages are polled this often so serving resumes soon after they answer.
RECOVERY_POLL_S = 0.5
# A hold re-checks for a broken pipeline this often while it waits for the drain.
HOLD_POLL_S = 0.05


class Frontend(EpochSwitching, StageRecovery, ZeroStages):
    """A running frontend. Everything runs on the event loop that called `start_frontend`."""

    def __init__(self, config: FrontendConfig, model: ServedModel) -> None:
        self.config = config
        self.model = model
        # Services hosted beside this frontend (e.g. `serve`'s reconfiguration endpoint), advertised in
        # /control/state so that tools need only the frontend's URL.
        self.endpoints: dict[str, str] = {}
        self.metrics = FrontendMetrics()
        self.started_at = int(time.time())
        self.port = 0
        self.infos: list[StageInfo] = []
        # The chain's control addresses in order; a layout switch replaces them.
        self.stages: list[str] = list(config.stages)
        self.stage_up = [False] * len(config.stages)
        self.scheduler: Scheduler
        # Agents may still hold sequences of an earlier frontend; a random first id avoids reusing theirs.
        self._seq_ids = itertools.count(secrets.randbits(40) << 20)
        self._wake = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._agents: list[AgentClient] = []
        self._data: DataPlane | None = None
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._breaking: asyncio.Task[None] | None = None
        self._held = asyncio.Event()
        self._epoch_state_init()
        self._recovery_init()
        self._zero_init()

    def next_seq_id(self) -> int:
        return next(self._seq_ids)

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()
        self._agents = [AgentClient(self._session, a, self.config.control_token) for a in self.config.stages]
        self.infos = list(await asyncio.gather(*(a.info() for a in self._agents)))
        if self.infos:
            self._check_stages()
        self.stage_up = [True] * len(self.infos)
        for i in range(len(self.infos)):
            self.metrics.stage_up.labels(str(i)).set(1)
        # At zero the mirror is a placeholder admitting anything: nothing is sent until stages attach, and
        # attaching rebuilds it from them.
        mirror = KVMirror(
            [
                StageBudget(i.stage_id, i.num_layers, i.block_size, i.total_blocks, i.reserved_blocks)
                for i in self.infos
            ]
            or [StageBudget(0, 0, 1, 0)]
        )
        sched_config = SchedulerConfig(
            slots=self.config.micro_batch_slots,
            max_batch_tokens=self.config.max_batch_tokens,
            max_queue=self.config.max_queue,
            step_timeout_s=self.config.step_timeout_s,
        )
        self.scheduler = Scheduler(
            sched_config, mirror, self._send, self.metrics, epoch=self.infos[0].epoch if self.infos else 0
        )
        self.scheduler.on_held = self._held.set
        self.scheduler.on_retired = self._retired.set
        if self.infos:
            await self._start_data_plane(self.infos[-1])
            await self._wire()
        else:
            self.scheduler.suspended = ZERO_REASON
        self._runner = web.AppRunner(build_app(self), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self._tasks = [
            asyncio.create_task(self._watch_timeouts()),
            asyncio.create_task(self._poll_health()),
            asyncio.create_task(self._expire_zero_waits()),
        ]
        logger.info("frontend serving %s on %s through %d stages", self.model.name, self.url, len(self.infos))

    async def _start_data_plane(self, last: StageInfo) -> None:
        """The return server sized for the last stage's logits (at zero: once stages first attach)."""
        # Rows of returned logits: every running sequence of a slot plus the prompts admitted with them.
        max_rows = 2 * self.config.max_batch_tokens
        self._data = DataPlane(
            host=self.config.host,
            token=self.config.control_token,
            vocab_size=last.vocab_size,
            dtype=last.torch_dtype,
            max_rows=max_rows,
            on_result=self._on_result,
            on_broken=self._on_broken,
        )
        await self._data.start()

    def _send(self, batch: MicroBatch) -> None:
        assert self._data is not None, "a batch was built with no stages attached"
        self._data.send(batch)

    async def stop(self) -> None:
        for task in [*self._tasks, *([self._breaking] if self._breaking else [])]:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
        if self._data is not None:
            await self._data.close()
        if self._session is not None:
            await self._session.close()

    def health(self) -> dict[str, Any]:
        stages = [
            {"stage": i, "address": a, "up": up}
            for i, (a, up) in enumerate(zip(self.stages, self.stage_up, strict=True))
        ]
        if self.at_zero:
            # Holding requests for stages to come back is what a frontend at zero is for: it stays Ready.
            return {"status": "zero", "stages": [], "waiting": len(self.scheduler.waiting)}
        down = self.scheduler.down_reason or self.scheduler.suspended
        status = "ok" if down is None and all(self.stage_up) else "degraded"
        body: dict[str, Any] = {"status": status, "stages": stages}
        if down is not None:
            body["error"] = down
        return body

    def control_state(self) -> dict[str, Any]:
        s = self.scheduler
        return {
            "model": self.model.name,
            "endpoints": dict(self.endpoints),
            "epoch": s.epoch,
            "old_epoch_in_flight": s.old_in_flight(),
            "gate": s.gate.value,
            "sequences": {str(k): v for k, v in s.live_sequences().items()},
            "return_address": self._data.return_address if self._data is not None else None,
            "slots": len(s.slots),
            "running": s.running,
            "waiting": len(s.waiting),
            "in_flight": sorted(s.in_flight),
            "down": s.down_reason,
            "suspended": s.suspended,
            "reserved_blocks": s.mirror.reserved_blocks,
            "stages": self.health()["stages"],
        }

    async def hold(self, timeout_s: float) -> list[int]:
        """Close the gate and wait until no micro-batch is in flight; the live sequences' ids.

        A hold that cannot drain (the pipeline broke, or `timeout_s` passed) reopens the gate, so a
        failed switch leaves the old chain serving, and raises SwitchError.
        """
        s = self.scheduler
        if s.down_reason is not None:
            raise SwitchError(f"cannot hold: the pipeline is down ({s.down_reason})")
        if s.gate is not Gate.HELD:
            self._held.clear()
            s.hold()
        deadline = time.monotonic() + timeout_s
        while s.gate is not Gate.HELD:
            if s.down_reason is not None or time.monotonic() > deadline:
                why = s.down_reason or f"{len(s.in_flight)} micro-batches still in flight after {timeout_s}s"
                s.open()
                raise SwitchError(f"the hold did not drain: {why}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._held.wait(), HOLD_POLL_S)
        return sorted(s.live_sequences())

    async def resume(self, stages: list[str] | None, epoch: int | None, reprefill: bool = False) -> None:
        """Serve again: on the old chain, or on `stages` (control addresses in order) at layout `epoch`.

        The new chain is read and wired before the gate opens; if that fails the gate stays closed
        (the stages have already switched, so serving on the old chain would be wrong) and a retry
        may try again. `reprefill`: the new stages started empty (a restart), so every live sequence is
        admitted again with fresh reservations and prefilled with its prompt and the tokens it generated.
        """
        s = self.scheduler
        if reprefill and stages is None:
            raise SwitchError("reprefill needs the new chain's stages: a restart replaces every stage")
        if stages is not None:
            if s.gate is not Gate.HELD:
                raise SwitchError(f"resume on new stages needs a completed hold; the gate is {s.gate.value}")
            await self._rewire(stages, reprefill)
            if epoch is not None:
                s.epoch = epoch
        s.open()
        logger.info("serving again at epoch %d through %d stages", s.epoch, len(self.stages))

    async def _rewire(self, stages: list[str], reprefill: bool) -> None:
        assert self._session is not None
        agents = [AgentClient(self._session, a, self.config.control_token) for a in stages]
        self.scheduler.watch()
        infos = list(await asyncio.gather(*(a.info() for a in agents)))
        old = (self.stages, self._agents, self.infos)
        from_zero = self.at_zero
        self.stages, self._agents, self.infos = list(stages), agents, infos
        try:
            self._check_stages()
            if self._data is None:
                await self._start_data_plane(infos[-1])
            await self._wire()
        except BaseException:
            self.stages, self._agents, self.infos = old
            raise
        if from_zero:
            self.scheduler.epoch = infos[0].epoch  # fresh stages serve their own epoch
            self._left_zero()
        self.stage_up = [True] * len(infos)
        for i in range(len(infos)):
            self.metrics.stage_up.labels(str(i)).set(1)
        if reprefill:
            fresh = KVMirror(
                [StageBudget(i.stage_id, i.num_layers, i.block_size, i.total_blocks, i.reserved_blocks) for i in infos]
            )
            requeued = self.scheduler.readmit_all(fresh)
            logger.info("re-prefilling %d live sequences on the new chain", len(requeued))
        else:
            self.scheduler.rebuild_mirror(*budgets(infos))

    def _check_stages(self) -> None:
        """The stages must hold the model's layers in order, with its vocabulary; else they are mis-wired."""
        expected = 0
        for address, info in zip(self.stages, self.infos, strict=True):
            if info.start != expected:
                raise UserError(
                    f"stage at {address} holds layers [{info.start}, {info.end}) but the pipeline "
                    f"needs one starting at layer {expected}"
                )
            expected = info.end
        if expected != self.model.config.num_layers:
            raise UserError(
                f"the stages hold layers [0, {expected}) but {self.model.name} has "
                f"{self.model.config.num_layers}"
            )
        if self.infos[-1].vocab_size != self.model.vocab_size:
            raise UserError(
                f"the last stage reports vocab_size {self.infos[-1].vocab_size}, the model's "
                f"config.json says {self.model.vocab_size}"
            )

    async def _wire(self) -> None:
        """Route every stage to the next and the last back to us, then dial stage 0."""
        assert self._data is not None
        downstream = [i.data_address for i in self.infos[1:]] + [self._data.return_address]
        await asyncio.gather(*(a.route(d) for a, d in zip(self._agents, downstream, strict=True)))
        first = self.infos[0]
        await self._data.connect(first.data_host, first.data_port)

    def _on_result(self, batch: MicroBatch) -> None:
        self.scheduler.on_result(batch)

    def _on_broken(self, reason: str) -> None:
        # While held nothing is in flight, so a stage going away fails no request: a restart stops every
        # stage then. A resume either rewires past it or its first batch breaks the pipeline for real.
        if self.scheduler.gate is Gate.HELD or self.at_zero:
            logger.info("while %s: %s", "at zero" if self.at_zero else "held", reason)
            return
        if self.suspend_for_recovery(reason):
            return
        if self.scheduler.down_reason is None and (self._breaking is None or self._breaking.done()):
            self._breaking = asyncio.create_task(self._break(reason))

    async def _break(self, reason: str) -> None:
        """Fail what is in flight, naming the stages that no longer answer, so the client learns which."""
        await self._check_health()
        down = [str(i) for i, up in enumerate(self.stage_up) if not up]
        where = f"; stage {', '.join(down)} not answering" if down else ""
        logger.error("pipeline failed: %s%s", reason, where)
        self.scheduler.fail_all(f"the stage pipeline failed: {reason}{where}")
        self._wake.set()

    async def _watch_timeouts(self) -> None:
        period = min(0.5, self.config.step_timeout_s / 4)
        while True:
            await asyncio.sleep(period)
            expired = self.scheduler.expired()
            if expired:
                self._on_broken(
                    f"micro-batch {expired[0]} did not return within {self.config.step_timeout_s}s"
                )

    async def _poll_health(self) -> None:
        while True:
            interval = self.config.health_interval_s
            if self.scheduler.down_reason is not None:
                interval = min(interval, RECOVERY_POLL_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)
            self._wake.clear()
            await self._check_health()
            if not all(self.stage_up):
                self._on_broken("a stage stopped answering its health check")
            elif self.scheduler.down_reason is not None:
                await self._recover()

    async def _check_health(self) -> None:
        agents = self._agents
        results = await asyncio.gather(*(a.healthy(HEALTH_TIMEOUT_S) for a in agents))
        if agents is not self._agents:
            return  # a switch replaced the chain meanwhile: these answers are about stages no longer in it
        for i, up in enumerate(results):
            if up != self.stage_up[i]:
                logger.warning("stage %d at %s is %s", i, self.stages[i], "up" if up else "down")
            self.stage_up[i] = up
            self.metrics.stage_up.labels(str(i)).set(1 if up else 0)

    async def _recover(self) -> None:
        """Every stage answers again: re-read them, re-wire the ring and serve again."""
        with contextlib.suppress(StageUnreachable, UserError, OSError, ConnectionError):
            self.infos = await asyncio.gather(*(a.info() for a in self._agents))
            self._check_stages()
            await self._wire()
            logger.info("all stages answer again; serving")
            self.scheduler.resume()


async def start_frontend(config: FrontendConfig) -> Frontend:
    """A frontend serving on `config.host:config.port` (port 0: a free one, see `.port`)."""
    frontend = Frontend(config, ServedModel.load(config.model_dir, config.model_name))
    try:
        await frontend.start()
    except BaseException:
        await frontend.stop()
        raise
    return frontend
