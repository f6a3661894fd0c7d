r"""Device broker over SOCK_DGRAM, speaking the APUE ``send_fd``/``recv_fd`` protocol.

The datagram sibling of ``device_broker.py`` (same devices, same simulated
instrument), for clients written the classic way: Stevens and Rago's
*Advanced Programming in the UNIX Environment* passes a descriptor with a
2-byte message, a NUL byte and then a status byte, and the descriptor
attached. Here each message is one datagram on an AF_UNIX ``SOCK_DGRAM``
socket bound to a path:

- request: the client, bound to a path of its own, sends the device name;
- granted: ``b"\\0\\0"`` (status 0) with the device's descriptor attached;
- refused: an error text, a NUL byte, then the status byte (an ``errno``
  value: ``ENOENT`` no such device, ``EACCES`` not this uid), no descriptor.

The broker learns who asks from ``SCM_CREDENTIALS`` (it is made with
``pass_credentials=True``): the kernel fills in the sender's pid, uid and
gid, which a client cannot forge. There is no connection, so there are no
leases: each grant is a new descriptor for the same open device.
``examples/c_peer/apue_client.c`` is a client in C, written from this
protocol (``tests/test_c_peer.py`` runs it).

    python examples/device_broker_dgram.py               # broker + three clients
    python examples/device_broker_dgram.py --self-test   # the same; exit 1 on failure
    python examples/device_broker_dgram.py --serve PATH  # the broker, until Ctrl-C
    python examples/device_broker_dgram.py --client PATH --device ttyS0

Every mode takes ``--backend asyncio|uvloop|trio``.
"""

from __future__ import annotations

import errno
import os
import sys
import tempfile
import termios

import anyio
from anyio.abc import TaskStatus

import aiofdpass

from _common import argument_parser, run, say
from device_broker import (
    FAILED,
    GRANTED,
    REFUSED,
    default_devices,
    instrument,
    read_line,
)

GRANT = b"\0\0"  # NUL, status 0: the descriptor is attached


def refusal(text: str, status: int) -> bytes:
    """Return the datagram that refuses a request: text, NUL, status byte."""
    return text.encode() + b"\0" + bytes([status])


def parse_reply(data: bytes) -> tuple[str, int]:
    """Split a reply into its text and status, as APUE's ``recv_fd`` does."""
    nul = data.find(b"\0")
    if nul < 0 or nul + 1 >= len(data):
        raise ValueError(f"not a send_fd reply: {data!r}")
    return data[:nul].decode(errors="replace"), data[nul + 1]


async def serve(path: str, *, task_status: TaskStatus[None]) -> None:
    """Answer requests on ``path`` until cancelled."""
    devices = {device.name: device for device in default_devices()}
    try:
        async with (
            anyio.create_task_group() as tg,
            await aiofdpass.create_datagram_socket(
                path, mode=0o666, pass_credentials=True
            ) as sock,
        ):
            for device in devices.values():
                tg.start_soon(instrument, device)
            say("broker", f"listening on {path} (SOCK_DGRAM)")
            task_status.started()
            async for message, address, credentials in sock:
                with message:  # requests carry no descriptors: close any
                    name = message.data.decode(errors="replace").strip("\0\n")
                if address is None or credentials is None:
                    say("broker", "a request from an unbound socket: nowhere to reply")
                    continue
                wanted = devices.get(name)
                if wanted is None:
                    reply = refusal(f"no device named {name!r}", errno.ENOENT)
                elif credentials.uid not in wanted.allowed_uids:
                    reply = refusal(
                        f"uid {credentials.uid} may not use {name}", errno.EACCES
                    )
                else:
                    reply = GRANT
                verdict = "granted" if reply == GRANT else "refused"
                say("broker", f"pid {credentials.pid} asks for {name!r}: {verdict}")
                try:
                    await sock.send(
                        reply,
                        [wanted.fd] if wanted is not None and reply == GRANT else [],
                        to=address,
                    )
                except OSError as exc:  # the client is gone
                    say("broker", f"could not reply to {address!r}: {exc}")
    finally:
        for device in devices.values():
            os.close(device.fd)
            os.close(device.instrument)


async def client(path: str, name: str) -> int:
    """Ask the broker for device ``name`` and return the exit status."""
    with tempfile.TemporaryDirectory(prefix="aiofdpass-client-") as tmp:
        own = os.path.join(tmp, "client.sock")
        async with await aiofdpass.create_datagram_socket(own) as sock:
            await sock.send(name.encode(), to=path)
            with anyio.fail_after(10):
                message = (await sock.receive()).message
    with message:
        text, status = parse_reply(message.data)
        if status:
            say("client", f"{name}: REFUSED: {errno.errorcode[status]}: {text}")
            return REFUSED
        port = message.fds[0].take()
    try:
        os.write(port, b"ID?\n")
        with anyio.fail_after(10):
            ident = (await read_line(port)).decode().strip()
        speed = termios.tcgetattr(port)[4] == termios.B115200
        say("client", f"{name}: GRANTED; the device says {ident!r}")
        return GRANTED if ident.startswith(name) and speed else FAILED
    finally:
        os.close(port)


async def end_to_end(backend: str) -> bool:
    """Run three clients against the broker and check what each was told."""
    me = [sys.executable, __file__, "--backend", backend]
    failures = []
    with tempfile.TemporaryDirectory(prefix="aiofdpass-broker-") as tmp:
        path = os.path.join(tmp, "broker.sock")
        async with anyio.create_task_group() as tg:
            await tg.start(serve, path)
            for name, expected in (
                ("ttyS0", GRANTED),
                ("ttyS1", REFUSED),
                ("x", REFUSED),
            ):
                command = [*me, "--client", path, "--device", name]
                with anyio.fail_after(20):
                    result = await anyio.run_process(command, check=False, stderr=None)
                sys.stdout.write(result.stdout.decode())
                if result.returncode != expected:
                    failures.append(f"{name}: exit {result.returncode}, not {expected}")
            tg.cancel_scope.cancel()
    for failure in failures:
        say("self-test", f"FAIL {failure}")
    print(
        f"device_broker_dgram self-test: {'FAIL' if failures else 'PASS'}: granted, "
        f"refused by uid, refused unknown ({backend})"
    )
    return not failures


async def serve_forever(path: str) -> None:
    """Run the broker on ``path`` until Ctrl-C."""
    await serve(path, task_status=anyio.TASK_STATUS_IGNORED)


def main() -> None:
    """Parse the command line and run the chosen mode."""
    parser = argument_parser(__doc__)
    parser.add_argument("--self-test", action="store_true", help="the default run")
    parser.add_argument("--serve", metavar="PATH", help="only run the broker on PATH")
    parser.add_argument("--client", metavar="PATH", help="ask the broker on PATH")
    parser.add_argument("--device", default="ttyS0", help="the device to ask for")
    args = parser.parse_args()
    if args.serve:
        run(serve_forever, args.serve, backend=args.backend)
    elif args.client:
        sys.exit(run(client, args.client, args.device, backend=args.backend))
    else:
        sys.exit(0 if run(end_to_end, args.backend, backend=args.backend) else 1)


if __name__ == "__main__":
    main()
