"""The package builds, and the wheel installs and works in a fresh venv.

Builds the sdist with ``python -m build`` and the wheel from that sdist (so
a file missing from the sdist breaks the wheel), installs the wheel into a
new ``python -m venv`` away from the source tree, and checks what a user
gets: the version from ``_version.py``, ``py.typed``, the metadata, and one
descriptor passed through a channel. Needs the package index (hatchling,
anyio), as ``make test`` does anyway.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.system

ROOT = Path(__file__).parent.parent
VERSION = re.search(
    r'^__version__ = "([^"]+)"$',
    (ROOT / "src" / "aiofdpass" / "_version.py").read_text(),
    flags=re.M,
)

SMOKE = """
import importlib.metadata as md, json, os, pathlib
import anyio, aiofdpass

async def main():
    left, right = aiofdpass.channel_pair()
    async with left, right:
        r, w = os.pipe()
        os.write(w, b"through the wheel")
        os.close(w)
        await left.send(b"x", [r], close_fds=True)
        with await right.receive() as msg:
            return os.read(msg.fds[0].fileno(), 100).decode()

meta = md.metadata("aiofdpass")
package = pathlib.Path(aiofdpass.__file__).parent
print(json.dumps({
    "version": aiofdpass.__version__,
    "dist_version": md.version("aiofdpass"),
    "location": str(package),
    "py_typed": (package / "py.typed").is_file(),
    "license": meta["License-Expression"],
    "classifiers": meta.get_all("Classifier"),
    "requires": meta.get_all("Requires-Dist"),
    "urls": meta.get_all("Project-URL"),
    "extras": meta.get_all("Provides-Extra"),
    "description": meta.get_payload(),
    "entry_points": sorted(
        (e.group, e.name, e.value)
        for e in md.distribution("aiofdpass").entry_points
    ),
    "smoke": anyio.run(main),
}))
"""


def run(*args: str | Path, cwd: Path | None = None) -> str:
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")
    }
    result = subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_build_sdist_and_wheel_and_install_in_a_fresh_venv(tmp_path: Path) -> None:
    assert VERSION is not None
    version = VERSION.group(1)
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "build", "--outdir", dist, ROOT)
    sdist = dist / f"aiofdpass-{version}.tar.gz"
    wheel = dist / f"aiofdpass-{version}-py3-none-any.whl"
    assert sorted(p.name for p in dist.iterdir()) == sorted([sdist.name, wheel.name])

    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for needed in (
        "src/aiofdpass/py.typed",
        "LICENSE",
        "CHANGELOG.md",
        "docs/protocol.md",
        "examples/c_peer/afd_peer.c",
        "tests/conftest.py",
    ):
        assert needed in names, needed
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
    assert "aiofdpass/py.typed" in names
    assert f"aiofdpass-{version}.dist-info/licenses/LICENSE" in names
    assert not any(n.startswith(("tests/", "docs/", "src/")) for n in names)

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    run(python, "-m", "pip", "install", "--quiet", wheel)
    info = json.loads(run(python, "-c", SMOKE, cwd=tmp_path))
    assert info["version"] == info["dist_version"] == version
    assert Path(info["location"]).is_relative_to(venv)  # not the source tree
    assert info["py_typed"] is True
    assert info["license"] == "MIT"
    for classifier in (
        "Framework :: AnyIO",
        "Framework :: AsyncIO",
        "Framework :: Trio",
        "Operating System :: POSIX :: Linux",
        "Typing :: Typed",
    ):
        assert classifier in info["classifiers"]
    runtime = [r for r in info["requires"] if "extra ==" not in r]
    assert len(runtime) == 1  # anyio only
    assert runtime[0].startswith("anyio")
    for version_ in ("3.10", "3.11", "3.12", "3.13"):
        assert f"Programming Language :: Python :: {version_}" in info["classifiers"]
    # Users' extras only; the project's tools are dependency groups (PEP 735),
    # which stay out of the published metadata.
    assert sorted(info["extras"]) == ["trio", "uvloop"]
    extras = sorted(
        r.replace(" ", "").replace("'", '"') for r in info["requires"] if "extra" in r
    )
    assert extras == [
        'trio>=0.27;extra=="trio"',
        'uvloop>=0.21;extra=="uvloop"',
    ]
    assert info["urls"] is None  # no placeholder addresses
    # The README renders outside the repository (on an index): no relative
    # links to files that are not there.
    description = info["description"]
    assert "aiofdpass[trio]" in description
    assert not re.findall(r"\]\((?!https?://)", description)
    assert "example.invalid" not in description
    assert info["entry_points"] == [
        ["console_scripts", "aiofdpass", "aiofdpass._cli:main"],
        ["pytest11", "aiofdpass", "aiofdpass.pytest_plugin"],
    ]
    assert info["smoke"] == "through the wheel"
    # The console script works from the fresh venv, outside the source tree.
    assert run(venv / "bin" / "aiofdpass", "--version", cwd=tmp_path) == (
        f"aiofdpass {version}\n"
    )
    listed = run(venv / "bin" / "aiofdpass", "inspect", "self", cwd=tmp_path)
    assert listed.startswith("fd 0: ")
