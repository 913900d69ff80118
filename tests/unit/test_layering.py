"""The layering rules of architecture 2.1, checked on the source.

protocol/ imports nothing of the package but errors, and no I/O modules;
block/ knows nothing of NBD or the server; construct stays in the layout
modules (wire.py and the formats' structs.py).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "nbdserve"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _modules(sub: str) -> list[Path]:
    return sorted((PACKAGE / sub).rglob("*.py"))


@pytest.mark.parametrize("path", _modules("protocol"), ids=lambda p: p.name)
def test_protocol_core_is_sans_io(path: Path) -> None:
    for name in _imports(path):
        top = name.split(".")[0]
        assert top not in {"trio", "socket", "os", "ssl", "selectors", "asyncio"}, name
        if name.startswith("nbdserve."):
            assert name.startswith(("nbdserve.protocol", "nbdserve.errors")), name


@pytest.mark.parametrize("path", _modules("block"), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_block_layer_knows_no_nbd(path: Path) -> None:
    allowed_nbd = path.name == "nbdclient.py"  # the NBD *client* base layer
    for name in _imports(path):
        assert not name.startswith("nbdserve.server"), name
        if not allowed_nbd:
            assert not name.startswith("nbdserve.protocol"), name


def test_construct_only_in_layout_modules() -> None:
    offenders = [
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if any(n.split(".")[0] == "construct" for n in _imports(p))
        and p.name not in ("wire.py", "structs.py")
    ]
    assert offenders == []
