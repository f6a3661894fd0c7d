"""The shipped pytest plugin, used as a user would: pytest on a small test file.

Each test runs pytest in a child process (``runpytest_subprocess``), which
finds the plugin through its ``pytest11`` entry point, as a user's pytest
does once aiofdpass is installed.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.system

LEAKY = """
import os

LEFT = []

def test_leaks_a_pipe(no_fd_leaks):
    LEFT.extend(os.pipe())

def test_leaks_a_file(no_fd_leaks, tmp_path):
    path = tmp_path / "kept-open.txt"
    path.write_text("x")
    LEFT.append(os.open(path, os.O_RDONLY))

def test_closes_what_it_opens(no_fd_leaks):
    r, w = os.pipe()
    os.close(r)
    os.close(w)
"""


def test_a_leaking_test_errors_naming_each_descriptor(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_user=LEAKY)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, errors=2)
    result.stdout.re_match_lines(
        [
            r".*ERROR at teardown of test_leaks_a_pipe.*",
            r".*left 2 more descriptor\(s\) open.*",
            r"\s+fd \d+: pipe pipe:\[\d+\] \(r\)",
            r"\s+fd \d+: pipe pipe:\[\d+\] \(w\)",
        ],
        consecutive=False,
    )
    result.stdout.re_match_lines(
        [
            r".*ERROR at teardown of test_leaks_a_file.*",
            r".*left 1 more descriptor\(s\) open.*",
            r"\s+fd \d+: file .*/kept-open.txt \(r\)",
        ],
        consecutive=False,
    )


def test_usefixtures_applies_it_to_every_test(pytester: pytest.Pytester) -> None:
    pytester.makepyprojecttoml(
        """
        [tool.pytest.ini_options]
        usefixtures = ["no_fd_leaks"]
        """
    )
    pytester.makepyfile(
        test_suite="""
        import socket

        KEPT = []

        def test_leaks_a_socket():
            KEPT.extend(socket.socketpair())

        def test_clean():
            a, b = socket.socketpair()
            a.close()
            b.close()
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.re_match_lines([r"\s+fd \d+: socket socket:\[\d+\] \(rw\)"])


def test_without_the_fixture_nothing_is_checked(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_free="import os\n\ndef test_x():\n    os.pipe()\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_the_plugin_can_be_turned_off(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_off="def test_x(no_fd_leaks):\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:aiofdpass")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'no_fd_leaks' not found*"])
