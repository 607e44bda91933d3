"""A change that meets a stage process that died: restart it and have the frontend prefill the live requests
again, so that nothing is lost (the recomputation is counted, not hidden).

Which layout the dead stage is restarted in follows the commit point: before it the change aborts and the
stage comes back in its old range; after it the change rolls forward and the stage comes back in its new
range, is committed there (epoch, route) and skipped by the steps that remain for the others. Only a
stage that is gone counts as dead (its `/health` does not answer: the connection is refused); a stage that
is merely slow or hung is left to the timeouts and retries of the calls.

The frontend must be keeping the requests of the broken chain (`recover_timeout_s`, see the frontend's
`recovery`); one that failed them fast still gets its chain back, but those requests are lost.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pipeshift.control.http import ControlCallError, call_all

if TYPE_CHECKING:
    from pipeshift.api import Layout
    from pipeshift.control.reconfigure import _Run

logger = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 2.0


def guard(run: _Run, seconds: float) -> None:
    """Ask the frontend to keep the requests of a chain that breaks for `seconds` (while the change runs, so
    that a stage that dies can be restarted under them), or no longer (0). Best effort: a frontend without
    the call fails them fast, as it always did."""
    try:
        run.frontend.post("/control/guard", {"request_id": run._id("guard"), "recover_timeout_s": seconds})
    except ControlCallError as error:
        logger.warning("%s: the frontend keeps no requests for a stage that dies: %s", run.report.reconfig_id, error)


def dead_stages(run: _Run, stage_ids: Sequence[int]) -> list[int]:
    """The stages among `stage_ids` whose process is gone."""

    def gone(sid: int) -> bool:
        try:
            run.clients[sid].get("/health", HEALTH_TIMEOUT_S)
        except ControlCallError as error:
            return error.status is None and not error.timed_out
        return False

    return [sid for sid, is_gone in zip(stage_ids, call_all(gone, list(stage_ids)), strict=True) if is_gone]


def restart(run: _Run, layout: Layout, stage_ids: Sequence[int]) -> None:
    """Start each stage again in its range of `layout` (after reaping what is left of it)."""
    assert run.start_stage is not None and run.stop_stage is not None
    for sid in stage_ids:
        logger.warning("%s: stage %d died; starting it again with layers %s", run.report.reconfig_id, sid,
                       list(layout.stage(sid).layers()))
        run.stop_stage(sid)
        run.clients[sid] = run._client(sid, run.start_stage(layout.stage(sid)))
        info = run.clients[sid].get("/info")
        run.data[sid] = f"{info['data']['host']}:{info['data']['port']}"
        run.report.restarted.append(sid)


def recover_frontend(run: _Run, layout: Layout, epoch: int | None) -> None:
    """The frontend serves through `layout`'s stages again, prefilling every live request."""
    body = {"request_id": run._id("recover"), "stages": [run.clients[s.stage_id].address for s in layout],
            **({} if epoch is None else {"epoch": epoch})}  # fmt: skip
    answer = run._forward(run.frontend, "/control/recover", body)
    run.report.requests_reprefilled += int(answer["requests_reprefilled"])


def _restart_dead(run: _Run, layout: Layout) -> list[int]:
    """The stages of `layout` that died, started again in their `layout` range; none when stages cannot be
    started here."""
    if run.start_stage is None or run.stop_stage is None:
        return []
    crashed = dead_stages(run, [s.stage_id for s in layout])
    if crashed:
        restart(run, layout, crashed)
    return crashed


def back_past_crash(run: _Run) -> bool:
    """After an abort: the old layout's stages that died are started again and the frontend serves through
    them; False when none died (or stages cannot be started here)."""
    if not _restart_dead(run, run.plan.old):
        return False
    recover_frontend(run, run.plan.old, None)
    return True


def forward_past_crash(run: _Run) -> bool:
    """After the commit point: start the new layout's stages that died in their new range, finish the change
    on the others and serve through all of them; False when none died (the failure is something else)."""
    crashed = _restart_dead(run, run.plan.new)
    if not crashed:
        return False
    roll_forward(run, crashed)
    return True


def roll_forward(run: _Run, lost: Sequence[int]) -> None:
    """The change past its commit point without the stages in `lost`, which died: those of the new layout
    already run again in their new range (`run.clients` and `run.data` point at them) and are committed there;
    a removed stage that died is only left out. The others finish the change, and the frontend serves through
    the new layout again, prefilling every live request (counted in `run.report.requests_reprefilled`).
    Every call repeats the change's request ids, so a caller that repeats this after a crash acts once."""
    new = [s.stage_id for s in run.plan.new]
    downstream = dict(zip(new, [run.data[sid] for sid in new[1:]] + [run.return_address], strict=True))
    for sid in (sid for sid in lost if sid in downstream):
        stage = run.plan.new.stage(sid)
        run._forward(run.clients[sid], "/reconfig/commit", {
            "request_id": run._id(f"commit-{sid}"), "reconfig_id": run.report.reconfig_id, "epoch": run.epoch,
            "layers": [stage.start, stage.end], "downstream": downstream[sid], "sequences": [],
            "resize": run.budget.resize})  # fmt: skip
    survivors = [sid for sid in new if sid not in lost]
    if run.report.switch == "epoch":
        _retire_survivors(run, survivors, lost)
    recover_frontend(run, run.plan.new, run.epoch)
    if run.report.switch == "epoch":
        run._forward(run.frontend, "/control/settle", {"request_id": run._id("settle")})


def _retire_survivors(run: _Run, survivors: list[int], lost: Sequence[int]) -> None:
    """The epoch switch's remaining steps on the stages that did not die (each answers a repeat without
    acting): the old epoch has left the frontend, the sources' pushes are confirmed, the old epoch retires."""
    budget = run.budget
    retire: dict[str, Any] = {"request_id": run._id("retire"), "epoch": run.epoch, "timeout_s": budget.hold_timeout_s}
    run._forward(run.frontend, "/control/retire", retire, budget.hold_timeout_s + budget.call_timeout_s)
    sources = sorted({p.source for p in run.pairs} - set(lost))
    call_all(lambda sid: run._forward(run.clients[sid], "/reconfig/flush", {
        "request_id": run._id(f"flush-{sid}"), "reconfig_id": run.report.reconfig_id,
        "timeout_s": budget.call_timeout_s / 2}), sources)  # fmt: skip
    call_all(lambda sid: run._forward(run.clients[sid], "/reconfig/retire", {
        "request_id": run._id(f"retire-{sid}"), "reconfig_id": run.report.reconfig_id, "epoch": run.epoch,
        "sequences": run.live}), survivors)  # fmt: skip
