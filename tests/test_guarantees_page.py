"""The guarantees page names tests that exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_every_test_named_in_the_guarantees_page_exists() -> None:
    text = (ROOT / "docs" / "guarantees.md").read_text()
    named = re.findall(r"`(tests/\w+\.py)::(\w+)`", text)
    assert len(named) > 50
    missing = []
    for file, name in set(named):
        tree = ast.parse((ROOT / file).read_text())
        tests = {
            node.name
            for node in tree.body
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        }
        if name not in tests:
            missing.append(f"{file}::{name}")
    assert missing == []
    # And every test module about faults is cited.
    for module in ("test_hostile", "test_cancellation", "test_concurrency"):
        cited = {n for f, n in named if f == f"tests/{module}.py"}
        source = (ROOT / "tests" / f"{module}.py").read_text()
        defined = set(re.findall(r"^(?:async )?def (test_\w+)", source, re.M))
        assert defined <= cited, (
            f"{module}: not in the guarantees page: {defined - cited}"
        )
