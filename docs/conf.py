"""Sphinx configuration for the aiofdpass documentation (``make docs``)."""

from __future__ import annotations

import logging
import typing
from typing import Any

from aiofdpass import __version__

project = "aiofdpass"
author = "aiofdpass developers"
copyright = "aiofdpass developers"
release = __version__
version = __version__

extensions = ["myst_parser", "sphinx.ext.autodoc"]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "code", "Thumbs.db", ".DS_Store"]

# Markdown: "## 3. How descriptors attach" gets an anchor usable as
# [text](protocol.md#3-how-descriptors-attach-to-records).
myst_heading_anchors = 3
myst_enable_extensions = ["deflist"]

# Pages that other branches add (examples/, guarantees, benchmarks) are
# picked up by glob patterns in index.md; a pattern that matches nothing yet
# is not an error. Sphinx 9.0 logs that warning without a type, so
# suppress_warnings cannot name it: a logging filter drops it instead.
suppress_warnings = ["toc.empty_glob"]


class _EmptyGlobIsFine(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "subtype", None) != "empty_glob"


logging.getLogger("sphinx.sphinx.directives.other").addFilter(_EmptyGlobIsFine())

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True  # mode=0o600, not 384
autodoc_default_options = {"show-inheritance": True}

# Every reference must resolve (make docs runs with -n -W). There is no
# network at build time, hence no intersphinx: names from the standard
# library, anyio and typing that autodoc sees in signatures and docstrings
# are accepted as they are.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:(class|exc|obj)", r"anyio(\.abc)?\.\w+"),
    (r"py:(class|meth)", r"anyio\.streams\.buffered\.[\w.]+"),
    # What a listener's accept() returns; each listener's docstring names it.
    (r"py:class", r"aiofdpass\._unix\.ConnectionT"),
    (r"py:class", r"collections\.abc\.\w+"),
    (r"py:class", r"socket\.socket|os\.PathLike|os\.stat_result"),
    (r"py:class", r"Buffer"),  # typing_extensions.Buffer, under TYPE_CHECKING
    # str | bytes | os.PathLike, shown by name where Buffer keeps autodoc
    # from evaluating a signature.
    (r"py:class", r"SocketPath"),
    (r"py:func", r"open"),
    (r"py:func", r"anyio\.\w+"),
    (r"py:data", r"subprocess\.DEVNULL|os\.environ"),
]

html_theme = "furo"
html_title = f"aiofdpass {release}"


def _hide_private_bases(
    app: object, name: str, obj: object, options: object, bases: list[type]
) -> None:
    """Show only public base classes (not aiofdpass._connection.Connection).

    A private base that exists only to share code (aiofdpass._unix's
    listener) is replaced by its own public bases.
    """
    shown: list[type] = []
    for base in bases:
        if not base.__module__.startswith("aiofdpass._"):
            shown.append(base)
        elif base.__name__.startswith("_"):
            inner = list((typing.get_origin(base) or base).__bases__)
            _hide_private_bases(app, name, obj, options, inner)
            shown += inner
    bases[:] = shown


def setup(app: Any) -> None:
    """Register the hooks above."""
    app.connect("autodoc-process-bases", _hide_private_bases)
