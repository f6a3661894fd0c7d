"""A minimal HTTP/1.1 keep-alive server, three ways: one process, a pool, SO_REUSEPORT.

``handle`` answers ``GET /`` with a line naming the process, and
``GET /cpu?ms=2`` after burning 2 ms of CPU (a stand-in for real work). It
keeps the connection open unless the client sends ``Connection: close`` (or
speaks HTTP/1.0). The same handler is served

- ``--serve single``: by one process that accepts and serves;
- ``--serve pool``: by :func:`aiofdpass.prefork.serve_tcp`: a master that
  accepts and hands each connection to the least loaded of ``--workers N``
  worker processes;
- ``--serve reuseport``: by ``N`` processes that each listen on the same port
  with ``SO_REUSEPORT`` and accept for themselves (what gunicorn, uvicorn and
  granian do, or they share one listening socket).

Each prints ``listening on 127.0.0.1:PORT`` and serves until SIGTERM or
Ctrl-C. ``bench/prefork_wrk.py`` measures the three with ``wrk``.

    python examples/prefork_http.py --serve pool --workers 4 --port 8080
    curl -s 'http://127.0.0.1:8080/cpu?ms=5'
    python examples/prefork_http.py --self-test    # all three, checked
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from contextlib import suppress
from typing import Any

import anyio
from anyio.abc import SocketStream, TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream

import aiofdpass
from aiofdpass.prefork import serve_tcp

from _common import argument_parser, run, say

HOST = "127.0.0.1"
MAX_HEAD = 16384
# The client closed, reset the connection, or sent a head that is too long.
CLIENT_GONE = (
    anyio.EndOfStream,
    anyio.IncompleteRead,
    anyio.DelimiterNotFound,
    anyio.BrokenResourceError,
)


def burn_cpu(ms: float) -> None:
    """Keep the CPU busy for ``ms`` milliseconds of this process's CPU time."""
    end = time.process_time() + ms / 1000
    while time.process_time() < end:
        pass


def respond(target: bytes) -> tuple[bytes, bytes]:
    """Return the status line's tail and the body for a request target."""
    path, _, query = target.partition(b"?")
    if path == b"/":
        return b"200 OK", b"hello from pid %d\n" % os.getpid()
    if path == b"/cpu":
        params = dict(p.partition(b"=")[::2] for p in query.split(b"&"))
        try:
            ms = float(params.get(b"ms", b"1"))
        except ValueError:
            return b"400 Bad Request", b"ms must be a number\n"
        burn_cpu(ms)
        return b"200 OK", b"burned %g ms in pid %d\n" % (ms, os.getpid())
    return b"404 Not Found", b"try / or /cpu?ms=2\n"


async def handle(stream: SocketStream, meta: dict[str, Any]) -> None:
    """Serve HTTP/1.1 requests on one connection until either side closes it."""
    with suppress(*CLIENT_GONE):
        await serve_requests(stream)


async def serve_requests(stream: SocketStream) -> None:
    """Answer requests until the client closes or asks to close."""
    reader = BufferedByteReceiveStream(stream)
    while True:
        head = await reader.receive_until(b"\r\n\r\n", MAX_HEAD)
        request_line, *headers = head.split(b"\r\n")
        try:
            _method, target, version = request_line.split(b" ", 2)
        except ValueError:
            await stream.send(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
            return
        close = version == b"HTTP/1.0"
        for header in headers:
            name, _, value = header.partition(b":")
            name = name.strip().lower()
            if name == b"connection":
                close = value.strip().lower() == b"close"
            elif name == b"content-length" and int(value) > 0:
                await reader.receive_exactly(int(value))  # a body: read, ignored
        status, body = respond(target)
        await stream.send(
            b"HTTP/1.1 %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s\r\n%s"
            % (status, len(body), b"Connection: close\r\n" if close else b"", body)
        )
        if close:
            return


# -- the three servers ---------------------------------------------------------


def listening(port: int) -> None:
    """Tell whoever started us where we listen (the bench and self-test read it)."""
    print(f"listening on {HOST}:{port}", flush=True)


async def serve_single(
    port: int,
    reuse_port: bool = False,
    *,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """One process accepts and serves (or one of N that share the port)."""
    listener = await anyio.create_tcp_listener(
        local_host=HOST, local_port=port, reuse_port=reuse_port
    )
    async with listener:
        task_status.started(listener.extra(anyio.abc.SocketAttribute.local_port))
        await listener.serve(serve_connection)


async def serve_connection(stream: SocketStream) -> None:
    """Serve one connection in this process, then close it."""
    async with stream:
        await handle(stream, {})


async def serve_reuseport(
    port: int, workers: int, backend: str, *, task_status: TaskStatus[int]
) -> None:
    """``workers`` processes, each listening on the same port with SO_REUSEPORT."""
    # Hold the port (bound, not listening: it takes no connections) so that
    # the children can bind it too; SO_REUSEPORT must be set on every socket.
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind((HOST, port))
        port = holder.getsockname()[1]
        command = [sys.executable, __file__, "--serve", "reuseport-child"]
        command += ["--port", str(port), "--backend", backend]
        children = [await aiofdpass.open_child_process(command) for _ in range(workers)]
        try:
            for _, channel in children:
                await channel.receive()  # "listening"
            task_status.started(port)
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                for process, channel in children:
                    await channel.aclose()  # the child exits at end of stream
                    await process.aclose()


async def reuseport_child(port: int) -> None:
    """One of the SO_REUSEPORT processes: serve until the parent closes our channel."""
    async with aiofdpass.channel_from_env() as parent, anyio.create_task_group() as tg:
        await tg.start(serve_single, port, True)
        await parent.send(b"listening")
        async for _ in parent:
            pass
        tg.cancel_scope.cancel()


async def serve(mode: str, port: int, workers: int, backend: str) -> None:
    """Run one server until SIGTERM or SIGINT; print where it listens."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with anyio.create_task_group() as tg:
            if mode == "single":
                port = await tg.start(serve_single, port)
            elif mode == "reuseport":
                port = await tg.start(serve_reuseport, port, workers, backend)
            else:
                target = "prefork_http:handle"
                _, port = await tg.start(
                    lambda task_status: serve_tcp(
                        HOST, port, target, workers=workers, task_status=task_status
                    )
                )
            listening(port)
            async for _ in signals:
                break
            tg.cancel_scope.cancel()


# -- the self-test -------------------------------------------------------------


async def get(
    stream: SocketStream,
    reader: BufferedByteReceiveStream,
    path: str,
    close: bool = False,
) -> tuple[bytes, bytes]:
    """Send one GET; return the status line and the body."""
    extra = "Connection: close\r\n" if close else ""
    await stream.send(f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
    head = await reader.receive_until(b"\r\n\r\n", MAX_HEAD)
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head.split(b"\r\n")[0], await reader.receive_exactly(length)


async def check_server(mode: str, backend: str, workers: int) -> list[str]:
    """Start one server process, check its answers, stop it; return the failures."""
    failures = []
    command = [sys.executable, __file__, "--serve", mode, "--workers", str(workers)]
    command += ["--backend", backend]
    async with await anyio.open_process(command, stderr=None) as process:
        assert process.stdout is not None
        output = BufferedByteReceiveStream(process.stdout)
        line = (await output.receive_until(b"\n", 4096)).decode()
        port = int(line.rsplit(":", 1)[1])
        pids = set()
        # Two keep-alive connections at once (least loaded: two workers),
        # three requests each, then one that asks to close.
        streams = [await anyio.connect_tcp(HOST, port) for _ in range(2)]
        for stream in streams:
            async with stream:
                reader = BufferedByteReceiveStream(stream)
                for path in ("/", "/cpu?ms=3", "/"):
                    status, body = await get(stream, reader, path)
                    if status != b"HTTP/1.1 200 OK":
                        failures.append(f"{mode} {path}: {status!r}")
                    pids.add(body.split()[-1])
                await get(stream, reader, "/", close=True)
                try:
                    await reader.receive()
                    failures.append(f"{mode}: data after Connection: close")
                except anyio.EndOfStream:
                    pass  # the server closed it, as asked
        process.send_signal(signal.SIGTERM)
        code = await process.wait()
        if code != 0:
            failures.append(f"{mode}: exit status {code}")
        expected = 2 if mode == "pool" else 1
        if mode != "reuseport" and len(pids) != expected:  # the kernel picks there
            failures.append(
                f"{mode}: answered by {len(pids)} processes, not {expected}"
            )
        say(
            "self-test",
            f"{mode}: 8 requests answered by {len(pids)} process(es), "
            f"exit status {code}",
        )
    return failures


async def self_test(backend: str) -> bool:
    """Check all three servers; print PASS or FAIL."""
    failures = []
    with anyio.fail_after(60):
        for mode in ("single", "pool", "reuseport"):
            failures += await check_server(mode, backend, 2)
    for failure in failures:
        say("self-test", f"FAIL {failure}")
    verdict = "FAIL" if failures else "PASS"
    print(f"prefork_http self-test: {verdict}: single, pool and reuseport ({backend})")
    return not failures


def main() -> None:
    """Parse the command line and run the chosen mode."""
    parser = argument_parser(__doc__)
    parser.add_argument(
        "--serve", choices=["single", "pool", "reuseport", "reuseport-child"]
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--self-test", action="store_true", help="run the checks")
    args = parser.parse_args()
    if args.serve == "reuseport-child":
        run(reuseport_child, args.port, backend=args.backend)
    elif args.serve:
        run(
            serve,
            args.serve,
            args.port,
            args.workers,
            args.backend,
            backend=args.backend,
        )
    else:
        sys.exit(0 if run(self_test, args.backend, backend=args.backend) else 1)


if __name__ == "__main__":
    main()
