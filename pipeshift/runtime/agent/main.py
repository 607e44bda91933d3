"""One pipeline stage serving: the stage loaded, its data server and control API up, until a signal.

Once both servers listen it prints one JSON line with their ports, which a launcher reads.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time

import torch
from aiohttp import web

from pipeshift.errors import UserError
from pipeshift.runtime.agent.config import AgentConfig
from pipeshift.runtime.agent.control import ControlAPI
from pipeshift.runtime.agent.dataplane import DataPlane
from pipeshift.runtime.agent.worker import StageWorker
from pipeshift.runtime.kv import KVCapacityError
from pipeshift.runtime.metrics import AgentMetrics
from pipeshift.runtime.model.checkpoint import ModelDir
from pipeshift.runtime.security import load_control_token
from pipeshift.runtime.stage import Stage
from pipeshift.runtime.threads import configure_threads

logger = logging.getLogger(__name__)


async def serve(config: AgentConfig) -> None:
    """Serves until SIGTERM or SIGINT, then closes connections and servers."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with RunningAgent(config) as ports:
        print(json.dumps(ports), flush=True)
        await stop.wait()
        logger.info("stage %d: stopping", config.stage_id)


class RunningAgent:
    """Loads the stage, starts the data plane and control API; yields the bound ports."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self._runner: web.AppRunner | None = None
        self._data: DataPlane | None = None
        self._worker: StageWorker | None = None

    async def __aenter__(self) -> dict[str, int]:
        try:
            return await self._start()
        except BaseException:
            await self.__aexit__()
            raise

    async def _start(self) -> dict[str, int]:
        c = self.config
        configure_threads(c.threads)
        token = load_control_token()
        model = ModelDir(c.model)
        self._check_layers(model.config.num_layers)
        dtype = getattr(torch, c.dtype)
        pool = {"kv_bytes": c.kv_bytes} if c.memory_bytes is None else {"memory_bytes": c.memory_bytes}
        try:
            stage = await asyncio.to_thread(Stage, model, c.start, c.end, dtype=dtype, block_size=c.block_size, **pool)
        except KVCapacityError as exc:
            raise UserError(f"--memory-bytes {c.memory_bytes}: {exc}") from None
        if c.warm:
            await asyncio.to_thread(self._warm, stage)
        metrics = AgentMetrics(stage=str(c.stage_id))
        self._worker = StageWorker(stage, c, model.config, metrics)
        self._data = DataPlane(self._worker, metrics, host=c.host, port=c.data_port, token=token)
        await self._data.start()
        control = ControlAPI(self._worker, self._data, metrics, token)
        self._runner = web.AppRunner(control.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, c.host, c.control_port).start()
        except OSError as exc:
            raise UserError(
                f"--control-port {c.control_port}: cannot listen on {c.host}: {exc.strerror}"
            ) from None
        control_port = int(self._runner.addresses[0][1])
        logger.info("stage %d: layers [%d, %d), data port %d, control port %d",
                    c.stage_id, c.start, c.end, self._data.port, control_port)  # fmt: skip
        return {"control_port": control_port, "data_port": self._data.port}

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._data is not None:
            await self._data.close()
        if self._worker is not None:
            self._worker.shutdown()

    def _warm(self, stage: Stage) -> None:
        """Touch the read workspaces for a gather of one layer's share of the pool, the most one step reads (every
        layer holds the same sequences): on a host where memory first touched costs ~2 ms/MiB, a stage that
        joins a running pipeline pays for it here, while idle, rather than at prepare (where it competes with
        serving for the host) or in its first steps (where every sequence waits for it)."""
        started = time.perf_counter()
        stage.cache.prefault_reads(stage.cache.total_blocks // (stage.end - stage.start))
        logger.info("stage %d: warmed %d MiB of read workspaces in %.2f s", self.config.stage_id,
                    stage.cache.stats()["workspace_bytes"] >> 20, time.perf_counter() - started)

    def _check_layers(self, num_layers: int) -> None:
        if self.config.end > num_layers:
            raise UserError(
                f"--layers {self.config.start}:{self.config.end} goes beyond the model's "
                f"{num_layers} layers (valid: 0 <= START < END <= {num_layers})"
            )
