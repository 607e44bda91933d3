"""`pipeshift serve` as a user runs it: a real process tree, real HTTP, and a clean stop on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest


def children_of(pid: int) -> set[int]:
    """Direct child processes, read from /proc (the agents that `serve` started)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie waiting to be reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_answers_completions_and_stops_every_process_on_a_signal(tiny_model: Path, sig: signal.Signals) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeshift.cli", "serve", "--model", str(tiny_model), "--layout", "1,1,1",
         "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ | {"PIPESHIFT_THREADS": "1"})
    try:
        line = proc.stdout.readline()  # "serving NAME on URL" once the pipeline is up
        assert line.startswith("serving "), line + proc.stderr.read()
        url = line.split(" on ", 1)[1].strip()
        agents = children_of(proc.pid)
        assert len(agents) == 3
        body = json.dumps({"prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0, "ignore_eos": True}).encode()
        request = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as resp:
            answer = json.load(resp)
        assert answer["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == 0
        assert not any(alive(pid) for pid in agents)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
