"""systemd restart without closing the port: a server keeps its socket in the fd store.

Started with no stored sockets, the server listens on a TCP port, uploads its
listening socket to systemd's fd store (``FDSTORE=1``, ``FDNAME=listener``)
and says ``READY=1``. When systemd restarts the service, it passes the stored
socket back (``LISTEN_FDS``/``LISTEN_FDNAMES``), and the new server picks it
up with ``aiofdpass.systemd.listen_fds()``: the port was never closed, and
clients that connected while no server ran are answered by the next one.
The unit file is in ``docs/systemd.md``.

The self-test plays systemd itself, with a datagram socket of its own as the
notify socket (no systemd needed): it starts a server, keeps the descriptor
it stores, stops the server, connects a client while no server runs, then
starts a second server with the stored socket as descriptor 3.

    python examples/systemd_restart.py              # the self-test
    python examples/systemd_restart.py --self-test  # the same; exit status 1 on failure
    python examples/systemd_restart.py --serve      # the server, as systemd runs it

Every mode takes ``--backend asyncio|uvloop|trio``.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import sys
import tempfile

import anyio
from anyio.abc import SocketListener, SocketStream

import aiofdpass
import aiofdpass.systemd

from _common import argument_parser, run, say

# -- the server, as systemd runs it ----------------------------------------------


async def serve(port: int) -> None:
    """Listen (or take the stored socket back), tell systemd, answer forever."""
    passed = dict(aiofdpass.systemd.listen_fds())
    stored = passed.pop("listener", None)
    for other in passed.values():
        other.close()
    if stored is None:
        sock = socket.create_server(("127.0.0.1", port))
        origin = "a new socket"
        await aiofdpass.systemd.store_fds([sock], name="listener")
    else:
        sock = stored.to_socket()
        origin = "the fd store"
    port = sock.getsockname()[1]
    say("server", f"listening on port {port} with {origin}")
    listener = await SocketListener.from_socket(sock)
    await aiofdpass.systemd.notify("READY=1", f"STATUS=serving port {port}")

    async def answer(stream: SocketStream) -> None:
        async with stream:
            await stream.send(f"pid {os.getpid()} with {origin}\n".encode())

    await listener.serve(answer)


# -- the self-test: this process plays systemd ----------------------------------


# What systemd does between fork and exec: LISTEN_PID is the child's own pid
# (exec keeps it), and the passed descriptor becomes number 3, inheritable.
TRAMPOLINE = """
import os, sys
os.environ["LISTEN_PID"] = str(os.getpid())
fd = int(sys.argv[1])
if fd >= 0 and fd != 3:
    os.dup2(fd, 3, inheritable=True)
    os.close(fd)
os.execv(sys.argv[2], sys.argv[2:])
"""


def command(backend: str, fd: int | None) -> list[str]:
    """Return the server's command line, started the way systemd starts it."""
    here = os.path.abspath(__file__)
    server = [sys.executable, here, "--serve", "--backend", backend]
    return [sys.executable, "-c", TRAMPOLINE, str(-1 if fd is None else fd), *server]


async def until_ready(
    notify: aiofdpass.FdDatagramSocket, pid: int, store: dict[str, aiofdpass.Fd]
) -> None:
    """Read the server's notifications until READY=1, keeping what it stores."""
    while True:
        message, _, credentials = await notify.receive()
        with message:
            # NotifyAccess=main: only the service's main process is heard.
            if credentials is None or credentials.pid != pid:
                say("systemd", f"ignored a datagram from {credentials}")
                continue
            fields = dict(
                line.split("=", 1) for line in message.data.decode().splitlines()
            )
            if fields.get("FDSTORE") == "1":
                name = fields.get("FDNAME", "stored")
                for fd in message.fds:
                    store[name] = aiofdpass.Fd(fd.take())
                say("systemd", f"stored the listening socket as {name!r}")
            if fields.get("READY") == "1":
                return


async def read_answer(stream: SocketStream) -> str:
    """Return the server's one-line answer."""
    answer = b""
    while not answer.endswith(b"\n"):
        answer += await stream.receive()
    return answer.decode().strip()


async def ask(port: int) -> str:
    """Connect and return the server's one-line answer."""
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        return await read_answer(stream)


async def end_to_end(backend: str) -> bool:
    """Start, stop and restart the server as systemd would; check every answer."""
    store: dict[str, aiofdpass.Fd] = {}
    answers: list[str] = []
    codes: list[int | None] = []
    with tempfile.TemporaryDirectory() as tmp, anyio.fail_after(60):
        path = os.path.join(tmp, "notify")
        async with await aiofdpass.create_datagram_socket(
            path, pass_credentials=True
        ) as notify:
            env = {**os.environ, "NOTIFY_SOCKET": path}
            first = await anyio.open_process(
                command(backend, None), env=env, stdout=None, stderr=None
            )
            await until_ready(notify, first.pid, store)
            port = socket.socket(fileno=os.dup(store["listener"].fileno()))
            with port:
                number = port.getsockname()[1]
            answers.append(await ask(number))
            first.send_signal(signal.SIGTERM)
            codes.append(await first.wait())
            say("systemd", f"first server stopped; port {number} is still open")
            # A client connects while no server runs: the stored socket's
            # backlog holds the connection for the next server.
            early = await anyio.connect_tcp("127.0.0.1", number)
            fd = fcntl.fcntl(store["listener"].fileno(), fcntl.F_DUPFD_CLOEXEC, 10)
            try:
                second = await anyio.open_process(
                    command(backend, fd),
                    env={**env, "LISTEN_FDS": "1", "LISTEN_FDNAMES": "listener"},
                    pass_fds=[fd],
                    stdout=None,
                    stderr=None,
                )
            finally:
                os.close(fd)
            await until_ready(notify, second.pid, store)
            async with early:
                answers.append(await read_answer(early))
            answers.append(await ask(number))
            second.send_signal(signal.SIGTERM)
            codes.append(await second.wait())
    for fd_obj in store.values():
        fd_obj.close()
    say("self-test", f"answers: {answers}; exit codes {codes}")
    ok = (
        len(answers) == 3
        and answers[0].endswith("with a new socket")
        and answers[1].endswith("with the fd store")
        and answers[2] == answers[1]
        and codes == [-signal.SIGTERM, -signal.SIGTERM]
    )
    if ok:
        say("self-test", "the client that came while no server ran was answered")
    print(
        f"systemd_restart self-test: {'PASS' if ok else 'FAIL'}: port {number} "
        f"kept open across a restart, {len(answers)} answers ({backend})"
    )
    return ok


def main() -> None:
    """Parse the command line and run the chosen mode."""
    parser = argument_parser(__doc__)
    parser.add_argument("--self-test", action="store_true", help="the default run")
    parser.add_argument("--serve", action="store_true", help="run the server")
    parser.add_argument("--port", type=int, default=0, help="TCP port (0: any)")
    args = parser.parse_args()
    if args.serve:
        run(serve, args.port, backend=args.backend)
    else:
        sys.exit(0 if run(end_to_end, args.backend, backend=args.backend) else 1)


if __name__ == "__main__":
    main()
