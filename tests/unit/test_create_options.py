"""``nbdserve img create -f FMT -o help`` lists exactly the options the create code takes.

The accepted names are derived from each format's create code, not copied:
the FVD parser's option tables, and for the others every ``opts.pop("name")``
/ ``_flag(opts, "name")`` in the function that parses ``-o`` (found with
``ast``).  The derivation itself is checked at run time: every derived name
gets past the parser's unknown-option check, and a made-up one does not.
"""

from __future__ import annotations

import ast
import inspect
import re
import subprocess
import sys
from collections.abc import Callable

import pytest
import trio

from nbdserve.block import rawfmt
from nbdserve.block.fvd import create as fvd_create
from nbdserve.block.parallels import create as parallels_create
from nbdserve.block.qcow2 import create as qcow2_create
from nbdserve.errors import ConfigError

MIB = 1024 * 1024


def _popped_names(func: Callable[..., object]) -> set[str]:
    """String keys the function pops from its options dict or reads with ``_flag``."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(inspect.getsource(func).lstrip())):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        if isinstance(node.func, ast.Attribute) and node.func.attr == "pop":
            key = node.args[0]
        elif isinstance(node.func, ast.Name) and node.func.id == "_flag" and len(node.args) > 1:
            key = node.args[1]
        else:
            continue
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            names.add(key.value)
    return names


def _fvd_names() -> set[str]:
    m = fvd_create
    return {*m._INT_OPTIONS, *m._SIZE_OPTIONS, *m._BOOL_OPTIONS, *m._STRING_OPTIONS}


def _parse(fmt: str, options: dict[str, str]) -> None:
    """Run the format's own ``-o`` parser on ``options`` (no file is written)."""
    if fmt == "fvd":
        fvd_create.parse_options(options)
    elif fmt == "qcow2":
        qcow2_create.build_header(MIB, options, None, None)
    elif fmt == "parallels":
        parallels_create.creation_layout(MIB, options)
    else:  # raw parses inside create_image: point it at a path that cannot be opened
        trio.run(rawfmt.create_image, "/nonexistent-dir/x.raw", MIB, dict(options))


ACCEPTED: dict[str, Callable[[], set[str]]] = {
    "fvd": _fvd_names,
    "qcow2": lambda: _popped_names(qcow2_create.build_header),
    "parallels": lambda: _popped_names(parallels_create.creation_layout),
    "raw": lambda: _popped_names(rawfmt.create_image),
}


def _unknown_error(fmt: str, options: dict[str, str]) -> bool:
    try:
        _parse(fmt, options)
    except ConfigError as exc:
        return "unknown" in str(exc)
    except Exception:
        return False
    return False


@pytest.mark.parametrize("fmt", sorted(ACCEPTED))
def test_derived_names_are_what_the_parser_accepts(fmt: str) -> None:
    names = ACCEPTED[fmt]()
    assert names, fmt
    for name in names:
        assert not _unknown_error(fmt, {name: "on"}), name
    assert _unknown_error(fmt, {"no_such_option": "1"})


@pytest.mark.parametrize("fmt", sorted(ACCEPTED))
def test_o_help_lists_every_option(fmt: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "nbdserve", "img", "create", "-f", fmt, "-o", "help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    lines = out.splitlines()
    assert lines[0] == "Supported options:"
    listed = {}
    for line in lines[1:]:
        m = re.fullmatch(r"  (\w+)=<([^>]+)> - (.+)", line)
        assert m, line
        listed[m.group(1)] = m.group(3)
    assert set(listed) == ACCEPTED[fmt]()
    for name, text in listed.items():
        # a value with no default is a free string (a path, a command)
        assert "(default: " in text or name in ("data_file", "add_storage_cmd"), name
