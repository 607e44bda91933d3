"""The loopback link's speed, measured the way the benchmark's KV throughput is judged against it.

One process `sendall`s `total` bytes in `chunk`-byte writes over a TCP connection on 127.0.0.1; the other
`recv_into`s them into one preallocated buffer and answers one byte once it has all of them. The speed is
`total / (time of that answer − time of the first write)`, taken on the sender's clock: it includes the
receiver's last read and the one-byte reply, never connection setup or process start. Both ends are
spawned processes (not threads), as stages are, so neither shares a GIL with anything else.
"""

from __future__ import annotations

import multiprocessing
import socket
import statistics
import time
from multiprocessing.connection import Connection
from typing import Any

CHUNK = 4 * 2**20
TOTAL = 256 * 2**20


def _receiver(port_out: Connection, total: int) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port_out.send(server.getsockname()[1])
        conn, _ = server.accept()
        with conn:
            buffer = memoryview(bytearray(total))
            got = 0
            while got < total:
                n = conn.recv_into(buffer[got:])
                if n == 0:
                    raise ConnectionError(f"the sender closed after {got} of {total} bytes")
                got += n
            conn.sendall(b"\x01")


def _sender(port: int, total: int, chunk: int, result: Connection) -> None:
    payload = memoryview(bytearray(chunk))
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        started = time.perf_counter()
        sent = 0
        while sent < total:
            n = min(chunk, total - sent)
            sock.sendall(payload[:n])
            sent += n
        if sock.recv(1) != b"\x01":
            raise ConnectionError("the receiver did not confirm the transfer")
        result.send(time.perf_counter() - started)


def measure_once(total: int = TOTAL, chunk: int = CHUNK) -> float:
    """Bytes per second of one transfer of `total` bytes in `chunk`-byte sendall calls."""
    if total < 1 or chunk < 1:
        raise ValueError(f"total and chunk must be positive, got total={total}, chunk={chunk}")
    ctx = multiprocessing.get_context("spawn")
    port_in, port_out = ctx.Pipe(duplex=False)
    result_in, result_out = ctx.Pipe(duplex=False)
    receiver = ctx.Process(target=_receiver, args=(port_out, total), daemon=True)
    receiver.start()
    try:
        if not port_in.poll(60):
            raise TimeoutError("the link-speed receiver did not start within 60 s")
        port = port_in.recv()
        sender = ctx.Process(target=_sender, args=(port, total, chunk, result_out), daemon=True)
        sender.start()
        try:
            if not result_in.poll(120):
                raise TimeoutError("the link-speed transfer did not finish within 120 s")
            seconds = float(result_in.recv())
        finally:
            sender.join(10)
    finally:
        receiver.join(10)
        if receiver.is_alive():
            receiver.kill()
    return total / seconds


def link_speed(trials: int = 3, total: int = TOTAL, chunk: int = CHUNK) -> dict[str, Any]:
    """The median of `trials` transfers (and each one), so one stall on a shared host does not decide it."""
    speeds = [measure_once(total, chunk) for _ in range(trials)]
    return {"bytes_per_s": statistics.median(speeds), "trials_bytes_per_s": speeds, "chunk_bytes": chunk,
            "total_bytes": total, "method": "sendall of chunk-byte writes between two spawned processes on "
                                           "127.0.0.1; receiver recv_into one buffer, answers 1 byte at the end"}
