"""The task with the standard library: socket.send_fds and socket.recv_fds."""

from __future__ import annotations

import os
import socket
import tempfile


def main() -> None:
    left, right = socket.socketpair()
    with left, right, tempfile.TemporaryFile() as file:
        file.write(b"file contents\n")
        file.flush()
        file.seek(0)
        r, w = os.pipe()
        os.write(w, b"pipe contents\n")
        os.close(w)

        socket.send_fds(left, [b"a file and a pipe"], [file.fileno(), r])  # blocks
        os.close(r)

        data, fds, flags, _ = socket.recv_fds(right, 1024, maxfds=2)  # blocks
        if flags & socket.MSG_CTRUNC:  # yours to check
            for fd in fds:
                os.close(fd)
            raise RuntimeError("the kernel dropped descriptors")
        print(data, len(fds), "inheritable:", [os.get_inheritable(fd) for fd in fds])
        with open(fds[0], "rb") as f, open(fds[1], "rb") as p:  # yours to close
            print(f.read(), p.read())


main()
