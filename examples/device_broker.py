"""Device broker: one process owns a serial device and lends its open fd to clients.

The broker opens each device once (a pseudo-terminal from ``os.openpty()``
stands in for a serial port, with a simulated instrument on the other side
that answers ``ID?``), configures it, and sets ``TIOCEXCL`` so that nobody
else can ``open()`` it. A client connects to the broker's UNIX socket and
asks for a device by name. The listener admits only the uids that may use
some device (``listen(allow=...)``: anyone else is closed before a byte is
read); for each request the broker checks who is asking with
``channel.peer_credentials`` (the peer's pid and uid, recorded by the kernel
at connect) and either sends the open descriptor, or an error record: the
uid may not use that device, or another client holds it (a lease lasts as
long as the client's connection). A refused client always gets an answer,
never a hang.

Why pass the fd instead of letting clients ``open()`` the device path: the
client needs no permission on the device node (the broker's policy decides),
opening a real serial port can reset the board on the other end (DTR), the
broker's settings (raw mode, speed) are already in place, and exclusive use
is enforced in one place.

    python examples/device_broker.py               # broker + four client processes
    python examples/device_broker.py --self-test   # the same; exit status 1 on failure
    python examples/device_broker.py --serve PATH  # only the broker, until Ctrl-C
    python examples/device_broker.py --client PATH --device ttyS0

Every mode takes ``--backend asyncio|uvloop|trio``.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import sys
import tempfile
import termios
import tty
from dataclasses import dataclass

import anyio
from anyio.abc import TaskStatus

import aiofdpass

from _common import argument_parser, run, say

GRANTED, FAILED, REFUSED = 0, 1, 2  # the client's exit status


async def read_line(fd: int) -> bytes:
    """Read up to a newline from a descriptor, waiting for it without blocking."""
    data = b""
    while not data.endswith(b"\n"):
        await anyio.wait_readable(fd)
        data += os.read(fd, 1024)
    return data


# -- the broker ----------------------------------------------------------------


@dataclass
class Device:
    """A device the broker owns: its fd, who may use it, who holds it."""

    name: str
    fd: int  # the "serial port" (the pty's terminal side)
    instrument: int  # the other side of the cable (the pty's master side)
    allowed_uids: set[int]
    holder: aiofdpass.FdChannel | None = None


def open_device(name: str, allowed_uids: set[int]) -> Device:
    """Open and configure a device once: raw mode, 115200 baud, exclusive."""
    instrument, port = os.openpty()
    tty.setraw(port)
    attrs = termios.tcgetattr(port)
    attrs[4] = attrs[5] = termios.B115200  # input and output speed
    termios.tcsetattr(port, termios.TCSANOW, attrs)
    fcntl.ioctl(port, termios.TIOCEXCL)  # further open()s fail with EBUSY
    return Device(name, port, instrument, allowed_uids)


async def instrument(device: Device) -> None:
    """Play the instrument at the far end of the cable: answer ``ID?``."""
    while True:
        command = (await read_line(device.instrument)).strip()
        answer = (
            f"{device.name} instrument, serial 0042" if command == b"ID?" else "ERR"
        )
        os.write(device.instrument, answer.encode() + b"\n")


class Broker:
    """Lend devices to the clients that may use them, one client at a time."""

    def __init__(self, devices: list[Device]) -> None:
        self.devices = {device.name: device for device in devices}

    def refusal(self, name: str, uid: int, channel: aiofdpass.FdChannel) -> str | None:
        """Return why this request is refused, or ``None`` to grant it."""
        device = self.devices.get(name)
        if device is None:
            return f"no device named {name!r}; there are {sorted(self.devices)}"
        if uid not in device.allowed_uids:
            return (
                f"uid {uid} may not use {name} (allowed: {sorted(device.allowed_uids)})"
            )
        if device.holder is not None and device.holder is not channel:
            return f"{name} is busy: pid {device.holder.peer_credentials.pid} holds it"
        return None

    def admitted(self, peer: aiofdpass.PeerCredentials) -> bool:
        """Admit a connection if its uid may use at least one device.

        The listener calls this before it reads anything from the peer; a
        refused peer is closed and the refusal logged. Which device a client
        may use is decided per request, in :meth:`refusal`.
        """
        return any(peer.uid in device.allowed_uids for device in self.devices.values())

    async def handle(self, channel: aiofdpass.FdChannel) -> None:
        """Answer one client's requests; release what it held when it leaves."""
        creds = channel.peer_credentials  # from the kernel, as of connect
        pid, uid = creds.pid, creds.uid
        try:
            async for message in channel:
                message.close()  # requests carry no descriptors
                name = str(json.loads(message.data).get("device"))
                reason = self.refusal(name, uid, channel)
                if reason:
                    say(
                        "broker",
                        f"pid {pid} (uid {uid}) asks for {name}: refused, {reason}",
                    )
                    await channel.send(
                        json.dumps({"ok": False, "error": reason}).encode()
                    )
                    continue
                device = self.devices[name]
                device.holder = channel
                say("broker", f"pid {pid} (uid {uid}) asks for {name}: granted")
                await channel.send(json.dumps({"ok": True}).encode(), [device.fd])
        finally:
            for device in self.devices.values():
                if device.holder is channel:
                    device.holder = None
                    say("broker", f"pid {pid} left: {device.name} is free again")

    async def serve(self, path: str, *, task_status: TaskStatus[None]) -> None:
        """Run the instruments and accept clients on ``path`` until cancelled."""
        async with (
            anyio.create_task_group() as tg,
            await aiofdpass.listen(path, allow=self.admitted) as listener,
        ):
            for device in self.devices.values():
                tg.start_soon(instrument, device)
            say("broker", f"listening on {path}")
            task_status.started()
            await listener.serve(self.handle)


def default_devices() -> list[Device]:
    """Return ttyS0, which this user may use, and ttyS1, which only another uid may."""
    me = os.getuid()
    return [open_device("ttyS0", {me}), open_device("ttyS1", {me + 1})]


# -- a client ------------------------------------------------------------------


async def client(path: str, name: str, hold: bool) -> int:
    """Ask the broker for device ``name``, use it, and return the exit status."""
    async with await aiofdpass.connect(path) as broker:
        await broker.send(json.dumps({"device": name}).encode())
        with anyio.fail_after(10):
            reply = await broker.receive()
        with reply:
            answer = json.loads(reply.data)
            if not answer["ok"]:
                say("client", f"{name}: REFUSED: {answer['error']}")
                return REFUSED
            port = reply.fds[0].take()
        try:
            os.write(port, b"ID?\n")
            with anyio.fail_after(10):
                ident = (await read_line(port)).decode().strip()
            speed = termios.tcgetattr(port)[4] == termios.B115200
            say(
                "client",
                f"{name}: GRANTED as fd {port}; the device says {ident!r}; "
                f"115200 baud already set: {speed}",
            )
            if not (ident.startswith(name) and speed):
                return FAILED
            try:
                os.close(os.open(os.ttyname(port), os.O_RDWR | os.O_NOCTTY))
                again = "worked (this process is root: TIOCEXCL does not stop root)"
            except OSError as exc:
                again = f"fails with {errno.errorcode[exc.errno or 0]}, as it should"
            say("client", f"a second open() of {os.ttyname(port)} {again}")
            if hold:
                say("client", f"{name}: HOLDING until stdin closes")
                await anyio.to_thread.run_sync(sys.stdin.read)
        finally:
            os.close(port)
    return GRANTED


# -- the end-to-end run: broker here, clients in processes of their own --------


async def end_to_end(backend: str) -> bool:
    """Run four clients against the broker and check what each was told."""
    me = [sys.executable, __file__, "--backend", backend]
    failures = []

    async def run_client(name: str, expected: int) -> None:
        command = [*me, "--client", path, "--device", name]
        with anyio.fail_after(20):  # a refused client must get an answer, not hang
            result = await anyio.run_process(command, check=False, stderr=None)
        sys.stdout.write(result.stdout.decode())
        if result.returncode != expected:
            failures.append(
                f"client for {name} exited {result.returncode}, not {expected}"
            )

    with tempfile.TemporaryDirectory(prefix="aiofdpass-broker-") as tmp:
        path = os.path.join(tmp, "broker.sock")
        broker = Broker(default_devices())
        async with anyio.create_task_group() as tg:
            await tg.start(broker.serve, path)
            holder_command = [*me, "--client", path, "--device", "ttyS0", "--hold"]
            async with await anyio.open_process(holder_command, stderr=None) as holder:
                assert holder.stdout is not None
                assert holder.stdin is not None
                with anyio.fail_after(20):
                    output = b""
                    async for chunk in holder.stdout:
                        output += chunk
                        if b"HOLDING" in output and output.endswith(b"\n"):
                            break
                sys.stdout.write(output.decode())
                await run_client("ttyS0", REFUSED)  # busy
                await run_client("ttyS1", REFUSED)  # not our uid
                await holder.stdin.aclose()  # the holder lets go
                async for chunk in holder.stdout:
                    sys.stdout.write(chunk.decode())
                if await holder.wait() != GRANTED:
                    failures.append(f"the holder exited {holder.returncode}")
            await run_client("ttyS0", GRANTED)  # free again
            tg.cancel_scope.cancel()
        for device in broker.devices.values():
            os.close(device.fd)
            os.close(device.instrument)
    for failure in failures:
        say("self-test", f"FAIL {failure}")
    verdict = "FAIL" if failures else "PASS"
    print(
        f"device_broker self-test: {verdict}: granted, refused busy, refused by uid, "
        f"granted after release ({backend})"
    )
    return not failures


async def serve_forever(path: str) -> None:
    """Run the broker on ``path`` until Ctrl-C."""
    await Broker(default_devices()).serve(path, task_status=anyio.TASK_STATUS_IGNORED)


def main() -> None:
    """Parse the command line and run the chosen mode."""
    parser = argument_parser(__doc__)
    parser.add_argument(
        "--self-test",
        action="store_true",
        help="run end to end and check (the default run)",
    )
    parser.add_argument("--serve", metavar="PATH", help="only run the broker on PATH")
    parser.add_argument(
        "--client", metavar="PATH", help="ask the broker on PATH for a device"
    )
    parser.add_argument(
        "--device", default="ttyS0", help="the device a client asks for"
    )
    parser.add_argument(
        "--hold",
        action="store_true",
        help="a client keeps the device until stdin closes",
    )
    args = parser.parse_args()
    if args.serve:
        run(serve_forever, args.serve, backend=args.backend)
    elif args.client:
        sys.exit(run(client, args.client, args.device, args.hold, backend=args.backend))
    else:
        sys.exit(0 if run(end_to_end, args.backend, backend=args.backend) else 1)


if __name__ == "__main__":
    main()
