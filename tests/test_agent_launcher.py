"""The local launcher: its agents are healthy, routed and stop cleanly; a failed start says why."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pipeshift.errors import UserError
from pipeshift.local.processes import start_agents


@pytest.fixture(scope="module")
def model_dir(model_factory: Callable[..., Path]) -> Path:
    return model_factory(layers=3, hidden=16, heads=2, kv_heads=1, intermediate=32, vocab=260, seed=1)


def test_agents_are_routed_in_layout_order_and_exit_cleanly_on_stop(model_dir: Path) -> None:
    with start_agents(model_dir, "1,2", threads=1, return_to="127.0.0.1:9") as agents:
        infos = [agents.control(a, "GET", "/info") for a in agents.agents]
        assert [i["layers"] for i in infos] == [[0, 1], [1, 3]]
        assert [i["stage_id"] for i in infos] == [0, 1]
        assert infos[0]["downstream"] == agents.agents[1].data_address
        assert infos[1]["downstream"] == "127.0.0.1:9"
        assert len({a.control_port for a in agents.agents} | {a.data_port for a in agents.agents}) == 4
        processes = [agents.process(a.stage_id) for a in agents.agents]
    # SIGTERM is a clean shutdown for an agent: exit status 0, not a signal death.
    assert [p.returncode for p in processes] == [0, 0]


def test_a_stage_that_cannot_start_raises_with_the_reason_from_its_log(model_dir: Path) -> None:
    with pytest.raises(UserError, match=r"--layers 0:5 goes beyond the model's 3 layers"):
        start_agents(model_dir, "5", threads=1)
