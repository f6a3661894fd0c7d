"""aiofdpass.prefork without child processes: the worker's loop run in this
process against a channel pair, the consistent-hash ring, argument checks."""

from __future__ import annotations

import gc
import json
import os
import socket
import warnings

import anyio
import pytest
from anyio.abc import SocketStream

from aiofdpass import Fd, FdChannel, channel_pair
from aiofdpass.prefork import WorkerPool, _Connection, _Ring, _run_worker

from .helpers import copies_of

pytestmark = pytest.mark.anyio


async def echo_once(stream: SocketStream, meta: dict[str, object]) -> None:
    """Answer one message with the metadata, or raise if asked to."""
    data = await stream.receive()
    if data == b"raise":
        raise ValueError("asked to raise")
    await stream.send(json.dumps(meta).encode())


async def recv(sock: socket.socket) -> bytes:
    """Read what is there (the worker runs in this event loop: never block)."""
    await anyio.wait_readable(sock)
    return sock.recv(100)


async def report(master: FdChannel) -> dict[str, object]:
    with await master.receive() as message:
        result: dict[str, object] = json.loads(message.data)
        return result


async def test_worker_takes_serves_and_reports(anyio_backend: object) -> None:
    master, worker = channel_pair()
    client, server = socket.socketpair()
    async with master, anyio.create_task_group() as tg:
        tg.start_soon(_run_worker, echo_once, worker)
        with anyio.fail_after(10), client:
            assert "ready" in await report(master)
            with server:
                await master.send(b'{"id": 1, "meta": {"peer": "x"}}', [server])
            assert await report(master) == {"taken": 1}
            assert copies_of(client.fileno()) == 1  # the worker's copy: a peer
            client.send(b"hi")
            assert json.loads(await recv(client)) == {"peer": "x"}
            assert await report(master) == {"done": 1, "error": None}
            # The handler's stream was closed when it returned.
            assert await recv(client) == b""
            await master.send(b'{"stop": 10}')
            with pytest.raises(anyio.EndOfStream):
                await master.receive()


async def test_worker_reports_a_handler_that_raises(
    anyio_backend: object, caplog: pytest.LogCaptureFixture
) -> None:
    master, worker = channel_pair()
    client, server = socket.socketpair()
    async with master, anyio.create_task_group() as tg:
        tg.start_soon(_run_worker, echo_once, worker)
        with anyio.fail_after(10), client:
            await report(master)
            with server:
                await master.send(b'{"id": 5, "meta": {}}', [server])
            assert await report(master) == {"taken": 5}
            client.send(b"raise")
            assert await report(master) == {
                "done": 5,
                "error": "ValueError('asked to raise')",
            }
            assert await recv(client) == b""
            await master.send_eof()
    assert "the handler failed on connection 5" in caplog.text


async def test_worker_without_master_closes_its_connections(
    anyio_backend: object,
) -> None:
    master, worker = channel_pair()
    client, server = socket.socketpair()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_run_worker, echo_once, worker)
        with anyio.fail_after(10), client:
            async with master:
                await report(master)
                with server:
                    await master.send(b'{"id": 1, "meta": {}}', [server])
                assert await report(master) == {"taken": 1}
            # The master is gone (no stop): the handler is cancelled at once.
            assert await recv(client) == b""


def test_ring_moves_only_the_keys_of_a_slot_that_is_down() -> None:
    ring = _Ring(4)
    keys = [f"user {n}" for n in range(400)]
    everyone = {key: ring.lookup(key, lambda slot: True) for key in keys}
    assert set(everyone.values()) == {0, 1, 2, 3}
    without_2 = {key: ring.lookup(key, lambda slot: slot != 2) for key in keys}
    for key in keys:
        if everyone[key] == 2:
            assert without_2[key] != 2
        else:
            assert without_2[key] == everyone[key]
    assert ring.lookup("anyone", lambda slot: False) is None
    assert ring.lookup(b"bytes", lambda slot: True) == ring.lookup(
        b"bytes", lambda slot: True
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"target": "no_colon"}, ValueError, "package.module:function"),
        ({"target": "mod:not an identifier"}, ValueError, "package.module"),
        ({"target": 3}, TypeError, "must be a string"),
        ({"workers": 0}, ValueError, "positive int"),
        ({"route": "random"}, TypeError, "least-loaded"),
        ({"backoff": -1}, ValueError, "backoff"),
        ({"backend": "curio"}, ValueError, "backend"),
    ],
)
def test_bad_arguments(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    arguments: dict[str, object] = {"target": "tests.prefork_child:lines", "workers": 1}
    with pytest.raises(error, match=match):
        WorkerPool(**{**arguments, **kwargs})  # type: ignore[arg-type]


async def test_worker_closes_a_connection_it_cannot_acknowledge(
    anyio_backend: object,
) -> None:
    # The master sent a connection and went away before the worker read it:
    # the worker's "taken" fails. The socket the worker had made of the
    # connection used to be left open (until the process exited; here,
    # until garbage collection, with a ResourceWarning).
    master, worker = channel_pair()
    client, server = socket.socketpair()
    with warnings.catch_warnings(record=True) as caught, client:
        warnings.simplefilter("always")
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(_run_worker, echo_once, worker)
                async with master:
                    assert "ready" in await report(master)
                    with server:
                        await master.send(b'{"id": 1, "meta": {}}', [server])
                # Closed before the worker ran again: it reads the record
                # (still buffered), then its "taken" fails, and it returns.
        gc.collect()
        assert client.recv(100) == b""  # the worker's copy is closed
    assert [str(w.message) for w in caught] == []


async def test_the_master_reads_reports_in_the_fixed_form_and_in_any_json(
    anyio_backend: object,
) -> None:
    # The worker's "taken" and "done" come in a fixed form that the master
    # reads without a JSON parser; the same reports spelt otherwise count
    # all the same.
    pool = WorkerPool("tests.prefork_child:lines", workers=1)
    worker = pool._workers[0]
    reports = [
        (b'{"taken": 1}', b'{"done": 1, "error": null}'),
        (b'{"taken":2}', b'{"error": null, "done": 2}'),
        (b'{ "taken": 3 }', b'{"done": 3, "error": "ValueError()"}'),
    ]
    for number, (taken, done) in enumerate(reports, 1):
        client, server = socket.socketpair()
        with client, server:
            copy = Fd(os.dup(server.fileno()))
            worker.pending[number] = _Connection(number, copy, {}, b"", None)
            assert not pool._on_report(worker, taken)
            assert (worker.pending, worker.active, copy.closed) == ({}, 1, True)
            assert not pool._on_report(worker, done)
            assert (worker.active, worker.served) == (0, number)
    assert worker.errors == 1
    assert pool._on_report(worker, b'{"ready": 4242}')
