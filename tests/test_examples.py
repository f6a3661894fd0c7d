"""Each example's self-test, run as real processes on every backend."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .test_c_peer import find_compiler

pytestmark = pytest.mark.system

EXAMPLES = Path(__file__).parent.parent / "examples"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}

# What each self-test must print besides its PASS line: proof that the
# scenario it claims really happened.
EXPECTED = {
    "echo_service": [
        "ok   read b'through the pipe' from the returned pipe end",
        'ok   read b"the file\'s content" from the returned file',
        "ok   ping through the returned socket, got b'ping-pong'",
    ],
    "prefork_server": [
        "200/200 connections answered",
        "exited with status -9",
        "4/4 in-flight connections answered, none by the killed worker: True",
        "4 re-dispatched",
    ],
    "prefork_http": [
        "single: 8 requests answered by 1 process(es), exit status 0",
        "pool: 8 requests answered by 2 process(es), exit status 0",
        "reuseport: 8 requests answered by",
    ],
    "device_broker": [
        "ttyS0: GRANTED",
        "REFUSED: ttyS0 is busy",
        "REFUSED: uid",
        "ttyS0 is free again",
    ],
    "device_broker_dgram": [
        "ttyS0: GRANTED; the device says 'ttyS0 instrument",
        "ttyS1: REFUSED: EACCES",
        "x: REFUSED: ENOENT",
    ],
    "shm_ring": ["shared memory ring: 8 MiB", "channel records: 8 MiB"],
    "hot_restart": [
        "[gen 3 pid",
        "successor pid",
        "handed the listening socket over",
        "0 refused",
    ],
    "systemd_restart": [
        "stored the listening socket as 'listener'",
        "with the fd store",
        "the client that came while no server ran was answered",
    ],
    # The cookbook's recipes (docs/foreign-protocols.md), each with a C peer.
    "foreign_apue": [
        "read through the descriptor: b'first line\\n'",
        "refused, status 1: can't open $TMP/missing.txt: No such file or directory",
    ],
    "foreign_nginx": ["with a pipe: hello from worker 0 through a pipe"],
    "foreign_counted": [
        'reply 2: "two files <- first memfd, second memfd" with 2 fds',
        "5 replies, clean end of stream",
    ],
}


@pytest.mark.parametrize("backend", ["asyncio", "uvloop", "trio"])
@pytest.mark.parametrize("example", sorted(EXPECTED))
def test_example_self_test(example: str, backend: str) -> None:
    if example.startswith("foreign_") and find_compiler() is None:
        pytest.skip("no C compiler (set $CC, or put cc on PATH) for its C peer")
    result = subprocess.run(
        [
            sys.executable,
            EXAMPLES / f"{example}.py",
            "--self-test",
            "--backend",
            backend,
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=90,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"{example} self-test: PASS" in result.stdout, output
    assert f"({backend})" in result.stdout, output
    for text in EXPECTED[example]:
        assert text in result.stdout, f"{text!r} missing from:\n{output}"
    assert "Traceback" not in output, output
    assert "Warning" not in output, output


def test_a_failing_self_test_exits_non_zero(tmp_path: Path) -> None:
    # The echo client against a server that does not exist must fail loudly.
    result = subprocess.run(
        [sys.executable, EXAMPLES / "echo_service.py", "--client", tmp_path / "x.sock"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "FileNotFoundError" in result.stderr
