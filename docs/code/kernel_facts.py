"""Check the kernel facts that "How descriptor passing works" states.

Standard library only, one socketpair, Linux. Run ``python kernel_facts.py``.
"""

from __future__ import annotations

import array
import errno
import os
import socket
import tempfile


def fds_in(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """Return the descriptor numbers in ``SCM_RIGHTS`` control messages."""
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return list(fds)


def receive(
    sock: socket.socket, room: int, flags: int = 0
) -> tuple[bytes, list[int], int]:
    """One recvmsg with a control buffer of ``room`` bytes."""
    data, ancdata, msg_flags, _ = sock.recvmsg(100, room, flags)
    return data, fds_in(ancdata), msg_flags


def close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def main() -> None:
    big = socket.CMSG_SPACE(253 * 4)
    a, b = socket.socketpair()
    with a, b, tempfile.TemporaryFile() as file:
        f = file.fileno()
        os.write(f, b"0123456789")
        os.lseek(f, 2, os.SEEK_SET)

        # The receiver gets a new number for the same open file.
        socket.send_fds(a, [b"x"], [f])
        _, (g,), _ = receive(b, big)
        same = os.fstat(f).st_ino == os.fstat(g).st_ino
        print(f"numbers: sent {f}, received {g}; same file: {same}")
        print("offset seen by the receiver:", os.lseek(g, 0, os.SEEK_CUR))
        os.read(g, 3)
        print("sender's offset after the receiver read 3:", os.lseek(f, 0, os.SEEK_CUR))
        os.set_blocking(g, False)
        print("O_NONBLOCK shared:", not os.get_blocking(f))
        print("inheritable without MSG_CMSG_CLOEXEC:", os.get_inheritable(g))
        os.close(g)
        os.set_blocking(f, True)

        # Close-on-exec from the start with MSG_CMSG_CLOEXEC.
        socket.send_fds(a, [b"x"], [f])
        _, (g,), _ = receive(b, big, socket.MSG_CMSG_CLOEXEC)
        print("inheritable with MSG_CMSG_CLOEXEC:", os.get_inheritable(g))
        os.close(g)

        # The sender may close right after sendmsg: the file stays alive.
        r, w = os.pipe()
        os.write(w, b"still here")
        socket.send_fds(a, [b"x"], [r])
        os.close(r)
        _, (g,), _ = receive(b, big)
        print("read after the sender closed its copy:", os.read(g, 100))
        close_all([g, w])

        # Descriptors travel with the first byte of their sendmsg.
        socket.send_fds(a, [b"abcdef"], [f])
        head, ancdata, _, _ = b.recvmsg(2, big)
        tail, ancdata2, _, _ = b.recvmsg(100, big)
        print(f"split read: {head!r} with {len(fds_in(ancdata))} fd,", end=" ")
        print(f"{tail!r} with {len(fds_in(ancdata2))}")
        close_all(fds_in(ancdata))

        # Plain bytes sent earlier may be glued in front; never two
        # descriptor-carrying sendmsgs in one read.
        a.send(b"plain")
        socket.send_fds(a, [b"withfd"], [f])
        socket.send_fds(a, [b"second"], [f])
        for _ in range(2):
            data, fds, _ = receive(b, big)
            print("one read:", data, len(fds), "fd")
            close_all(fds)

        # A control buffer too small: data arrives, descriptors are dropped,
        # and only MSG_CTRUNC says so.
        socket.send_fds(a, [b"three"], [f, f, f])
        data, fds, flags = receive(b, socket.CMSG_SPACE(4))
        truncated = bool(flags & socket.MSG_CTRUNC)
        print(
            f"CMSG_SPACE(4) = {socket.CMSG_SPACE(4)}: {data!r}, {len(fds)} of 3 fds,"
            f" MSG_CTRUNC {truncated}"
        )
        close_all(fds)

        # At most 253 descriptors per sendmsg.
        socket.send_fds(a, [b"x"], [f] * 253)
        _, fds, _ = receive(b, big)
        print("253 descriptors:", len(fds), "received")
        close_all(fds)
        try:
            socket.send_fds(a, [b"x"], [f] * 254)
        except OSError as exc:
            print("254 descriptors:", errno.errorcode[exc.errno or 0])

        # Descriptors with zero bytes of data vanish.
        print(
            "sendmsg of 0 bytes with a descriptor returned", socket.send_fds(a, [], [f])
        )
        a.send(b"next")
        data, fds, _ = receive(b, big)
        print("next read:", data, len(fds), "fds")

    packets(big)


def packets(big: int) -> None:
    """SOCK_SEQPACKET: the kernel keeps the boundaries (one packet, one read)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        # An empty packet and the end of the stream read the same...
        a.send(b"")
        print("empty packet:", receive(b, big))
        # ... unless SO_PASSCRED is on: then every packet brings credentials
        # (also one queued before the option was set), and the end none.
        a.send(b"")
        b.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        _, ancdata, _, _ = b.recvmsg(100, big)
        print("empty packet with SO_PASSCRED:", len(ancdata), "control message")
        # The next packet's length, peeked without a control buffer, then the
        # packet read with none: its descriptors never enter this process.
        r, w = os.pipe()
        socket.send_fds(a, [b"x" * 1000], [r, w])
        close_all([r, w])
        length = b.recv_into(bytearray(1), 1, socket.MSG_PEEK | socket.MSG_TRUNC)
        _, ancdata, flags, _ = b.recvmsg(1, 0)
        dropped = bool(flags & socket.MSG_CTRUNC) and not ancdata
        print(f"peeked length: {length}; read with no control buffer:", end=" ")
        print(f"fds dropped {dropped}")
        a.close()
        _, ancdata, _, _ = b.recvmsg(100, big)
        print("end of stream with SO_PASSCRED:", len(ancdata), "control messages")


main()
