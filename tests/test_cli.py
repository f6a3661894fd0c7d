"""The command-line tool, run as a user runs it: ``python -m aiofdpass``/``aiofdpass``.

Every test but the first ones (what ``_describe`` says of each kind of
descriptor, in this process) starts real processes.
"""

from __future__ import annotations

import os
import resource
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

import aiofdpass
from aiofdpass._codec import encode_header
from aiofdpass._describe import describe, list_fds

SCRIPT = Path(sys.executable).parent / "aiofdpass"
MODULE = [sys.executable, "-m", "aiofdpass"]


# -- what a descriptor is called (no processes) ------------------------------


@pytest.fixture
def closing() -> Iterator[list[int]]:
    fds: list[int] = []
    yield fds
    for fd in fds:
        os.close(fd)


def test_describe_names_each_kind(tmp_path: Path, closing: list[int]) -> None:
    r, w = os.pipe()
    a, b = socket.socketpair()
    with select.epoll() as ep:
        epfd = os.dup(ep.fileno())
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "f").write_text("x")
    closing.extend([r, w, a.detach(), b.detach(), epfd])
    closing.append(os.memfd_create("shown"))
    closing.append(os.eventfd(0))
    closing.append(os.open(tmp_path / "f", os.O_RDWR))
    closing.append(os.open(tmp_path, os.O_RDONLY))
    closing.append(os.open(tmp_path / "fifo", os.O_RDONLY | os.O_NONBLOCK))
    closing.append(os.open("/dev/null", os.O_WRONLY))
    seen = [describe(fd) for fd in closing]
    assert [(i.kind, i.access) for i in seen] == [
        ("pipe", "r"),
        ("pipe", "w"),
        ("socket", "rw"),
        ("socket", "rw"),
        ("epoll", "rw"),
        ("memfd", "rw"),
        ("eventfd", "rw"),
        ("file", "rw"),
        ("directory", "r"),
        ("fifo", "r"),
        ("char device", "w"),
    ]
    assert seen[0].target.startswith("pipe:[")
    assert seen[5].target == "/memfd:shown (deleted)"
    assert seen[6].target == "anon_inode:[eventfd]"
    assert seen[7].target == str(tmp_path / "f")
    assert str(seen[8]) == f"fd {closing[8]}: directory {tmp_path} (r)"
    listed = {i.fd: i for i in list_fds()}
    assert all(listed[i.fd] == i for i in seen)


def test_describe_a_closed_descriptor_raises(closing: list[int]) -> None:
    r, w = os.pipe()
    os.close(w)
    closing.append(r)
    with pytest.raises(FileNotFoundError):
        describe(w)


# -- the tool as a process ---------------------------------------------------


def cli(*args: str | Path, script: bool = False) -> subprocess.CompletedProcess[str]:
    command = [str(SCRIPT)] if script else MODULE
    return subprocess.run(
        [*command, *map(str, args)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.system
@pytest.mark.parametrize("script", [False, True], ids=["python -m", "script"])
def test_version_and_help(script: bool) -> None:
    assert SCRIPT.is_file(), "the console script is missing: run `make install`"
    result = cli("--version", script=script)
    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        f"aiofdpass {aiofdpass.__version__}\n",
        "",
    )
    result = cli("--help", script=script)
    assert result.returncode == 0
    for text in ("listen", "send", "inspect", "exit status: 0 done, 1 an error"):
        assert text in result.stdout
    for command in ("listen", "send", "inspect"):
        result = cli(command, "--help", script=script)
        assert result.returncode == 0
        assert f"usage: aiofdpass {command}" in result.stdout


@pytest.mark.system
@pytest.mark.parametrize(
    ("args", "says"),
    [
        ((), "the following arguments are required: COMMAND"),
        (("listen",), "the following arguments are required: PATH"),
        (("listen", "x.sock", "--count", "0"), "not a positive number: '0'"),
        (("inspect", "init"), "not a process id or 'self': 'init'"),
        (("send", "x.sock", "--stream", "--file", "f"), "needs --data"),
        (("frobnicate",), "invalid choice: 'frobnicate'"),
        (("send", ""), "argument PATH: the socket path is empty"),
        (("listen", "", "--stream"), "argument PATH: the socket path is empty"),
    ],
)
def test_bad_usage_exits_2_saying_why_on_stderr(
    args: tuple[str, ...], says: str
) -> None:
    result = cli(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "usage: aiofdpass" in result.stderr
    assert says in result.stderr


@pytest.mark.system
def test_errors_exit_1_saying_why_on_stderr(tmp_path: Path, closing: list[int]) -> None:
    missing = tmp_path / "nobody.sock"
    (tmp_path / "plain").write_text("not a socket")
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    event = os.eventfd(0)
    closing.append(event)
    eventfd = f"/proc/{os.getpid()}/fd/{event}"
    for args, says in [
        (("send", missing), f"cannot connect to '{missing}'"),
        (("send", missing, "--file", tmp_path / "nofile"), "No such file"),
        (("listen", tmp_path / "plain"), "exists and is not a socket"),
        (("send", missing, "--file", eventfd), "cannot be opened by path"),
        (("inspect", str(pid_max + 1)), f"no process with pid {pid_max + 1}"),
    ]:
        result = cli(*args)
        assert result.returncode == 1, result
        assert result.stdout == ""
        assert result.stderr.startswith(f"aiofdpass {args[0]}: error: ")
        assert says in result.stderr
        assert "Traceback" not in result.stderr
    assert (tmp_path / "plain").read_text() == "not a socket"


class Listener:
    """``aiofdpass listen`` as a child process, read line by line."""

    def __init__(self, path: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [*MODULE, "listen", str(path), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.readline() == f"listening on {path}"

    def readline(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().rstrip("\n")

    def finish(self) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, out, err


@pytest.mark.system
def test_send_then_listen_prints_each_record_and_its_descriptors(
    tmp_path: Path, closing: list[int]
) -> None:
    path = tmp_path / "s.sock"
    (tmp_path / "notes.txt").write_text("hello")
    memfd = os.memfd_create("sent-by-path")
    closing.append(memfd)
    listener = Listener(path, "--count", "2")
    result = cli(
        "send",
        path,
        "--data",
        "two files",
        "--file",
        tmp_path / "notes.txt",
        "--file",
        f"/proc/{os.getpid()}/fd/{memfd}",
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == f"sent 9 bytes and 2 fds to {path}\n"
    result = cli("send", path, "--data", "x" * 100)
    assert result.returncode == 0
    status, out, err = listener.finish()
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("record 1 from pid ")
    assert lines[0].endswith(f"uid {os.getuid()}: b'two files' (9 bytes), 2 fds")
    assert lines[1].endswith(f": file {tmp_path / 'notes.txt'} (r)")
    assert lines[2].endswith(": memfd /memfd:sent-by-path (deleted) (r)")
    assert lines[3].endswith(f": b'{'x' * 64}'... (100 bytes), 0 fds")
    assert not path.exists()  # the listener removed its socket file


@pytest.mark.system
def test_stream_mode(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    (tmp_path / "notes.txt").write_text("hello")
    listener = Listener(path, "--stream", "--count", "1")
    result = cli(
        "send", path, "--stream", "--data", "hi", "--file", tmp_path / "notes.txt"
    )
    assert result.returncode == 0, result
    status, out, err = listener.finish()
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].startswith("read 1 from pid ")
    assert lines[0].endswith(": b'hi' (2 bytes), 1 fd")
    assert lines[1].endswith(f": file {tmp_path / 'notes.txt'} (r)")


@pytest.mark.system
def test_interrupt_exits_130_and_removes_the_socket(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    listener = Listener(path)
    assert path.is_socket()
    listener.proc.send_signal(signal.SIGINT)
    status, out, err = listener.finish()
    assert (status, out, err) == (130, "", "")
    assert not path.exists()


@pytest.mark.system
@pytest.mark.parametrize("stream", [[], ["--stream"]], ids=["records", "stream"])
def test_sigterm_exits_143_and_removes_the_socket(
    tmp_path: Path, stream: list[str]
) -> None:
    path = tmp_path / "s.sock"
    listener = Listener(path, *stream)
    assert path.is_socket()
    listener.proc.send_signal(signal.SIGTERM)
    status, out, err = listener.finish()
    assert (status, out, err) == (143, "", "")
    assert not path.exists()


@pytest.mark.system
def test_a_peer_that_breaks_the_framing_is_one_line_on_stderr(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    listener = Listener(path, "--count", "1")
    with socket.socket(socket.AF_UNIX) as peer:
        peer.connect(str(path))
        peer.sendall(b"GET / HTTP/1.0\r\n\r\n")
        # The listener closes the connection once it has said why.
        assert peer.recv(1) == b""
    result = cli("send", path, "--data", "ok")
    assert result.returncode == 0, result
    status, out, err = listener.finish()
    assert status == 0
    assert out.endswith(": b'ok' (2 bytes), 0 fds\n")
    assert err.startswith("aiofdpass listen: connection from pid ")
    assert ": ProtocolError: bad magic b'GE'" in err
    assert len(err.splitlines()) == 1, err


@pytest.mark.system
@pytest.mark.parametrize("stream", [[], ["--stream"]], ids=["records", "stream"])
def test_descriptors_lost_on_one_connection_are_one_line_on_stderr(
    tmp_path: Path, closing: list[int], stream: list[str]
) -> None:
    path = tmp_path / "s.sock"
    listener = Listener(path, "--count", "1", *stream)
    # Too few descriptors left in the listener for what arrives: MSG_CTRUNC.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.prlimit(listener.proc.pid, resource.RLIMIT_NOFILE, (32, hard))
    r, w = os.pipe()
    closing.extend([r, w])
    with socket.socket(socket.AF_UNIX) as peer:
        peer.connect(str(path))
        record = encode_header(1, 40) + b"x"  # also valid framing
        socket.send_fds(peer, [record], [r] * 40)
        assert peer.recv(1) == b""  # closed once the listener said why
    result = cli("send", path, "--data", "ok", *stream)
    assert result.returncode == 0, result
    status, out, err = listener.finish()
    assert status == 0
    assert out.endswith(": b'ok' (2 bytes), 0 fds\n")
    assert err.startswith("aiofdpass listen: connection from pid ")
    assert ": DescriptorsLostError: the kernel dropped descriptors" in err
    assert len(err.splitlines()) == 1, err


@pytest.mark.system
def test_listen_stops_when_its_output_is_closed(tmp_path: Path) -> None:
    # `aiofdpass listen PATH | head -1`: once head exits, the listener must
    # stop (quietly, status 1) instead of logging every record it cannot print.
    path = tmp_path / "s.sock"
    listener = Listener(path, "--count", "5")
    proc = listener.proc
    assert proc.stdout is not None
    assert proc.stderr is not None
    with proc.stderr:
        try:
            proc.stdout.close()
            result = cli("send", path, "--data", "one")
            assert result.returncode == 0, result
            assert proc.wait(timeout=60) == 1
        finally:
            proc.kill()
            proc.wait()
        assert proc.stderr.read() == ""
    assert not path.exists()


@pytest.mark.system
def test_inspect_into_a_closed_pipe_exits_1_quietly() -> None:
    r, w = os.pipe()
    os.close(r)
    try:
        result = subprocess.run(
            [*MODULE, "inspect", "self"],
            stdin=subprocess.DEVNULL,
            stdout=w,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(w)
    assert (result.returncode, result.stderr) == (1, "")


@pytest.mark.system
def test_inspect_another_process_and_self() -> None:
    r, w = os.pipe()
    try:
        child = subprocess.Popen(
            [sys.executable, "-c", "import sys; sys.stdin.read()"],
            stdin=subprocess.PIPE,
            pass_fds=[r],
        )
    finally:
        os.close(r)
        os.close(w)
    try:
        result = cli("inspect", str(child.pid))
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=60)
    assert result.returncode == 0
    pipe_lines = [line for line in result.stdout.splitlines() if ": pipe " in line]
    # stdin, and the read end it inherited under its own number
    assert f"fd {r}: pipe" in "\n".join(pipe_lines)
    assert pipe_lines[0].startswith("fd 0: pipe pipe:[")
    result = cli("inspect", "self")
    assert result.returncode == 0
    assert result.stdout.startswith("fd 0: char device /dev/null (rw)\n")


@pytest.mark.system
@pytest.mark.anyio
async def test_listen_describes_and_closes_what_a_program_sends(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.sock"
    async with await anyio.open_process(
        [*MODULE, "listen", str(path), "--count", "2"]
    ) as proc:
        assert proc.stdout is not None
        lines = BufferedByteReceiveStream(proc.stdout)

        async def line() -> str:
            return (await lines.receive_until(b"\n", 4096)).decode()

        assert await line() == f"listening on {path}"
        r, w = os.pipe()
        a, b = socket.socketpair()
        ev = os.eventfd(0)
        mem = os.memfd_create("shared")
        async with await aiofdpass.connect(path) as channel:
            await channel.send(b"kinds", [r, a, ev, mem], close_fds=True)
            got = [await line() for _ in range(5)]
            # Closed once described: the listener holds none of them now.
            inspected = await anyio.run_process([*MODULE, "inspect", str(proc.pid)])
            await channel.send(b"done")
        os.close(w)
        b.close()
        assert await proc.wait() == 0
    assert got[0].endswith(": b'kinds' (5 bytes), 4 fds")
    assert ": pipe pipe:[" in got[1]
    assert ": socket socket:[" in got[2]
    assert got[3].endswith(": eventfd anon_inode:[eventfd] (rw)")
    assert got[4].endswith(": memfd /memfd:shared (deleted) (rw)")
    held = inspected.stdout.decode()
    for shown in got[1:]:
        target = shown.split(" ")[5]  # "  fd N: kind target (mode)"
        assert target not in held, held
    assert "eventfd" not in held
