from __future__ import annotations

from pathlib import Path

from tests.conftest import require_tools
from tests.helpers.server import export, run, running_server, uri


async def test_qemu_img_compare_raw(tmp_path: Path) -> None:
    require_tools("qemu-img")
    img = tmp_path / "disk.raw"
    img.write_bytes(bytes(range(256)) * 4096 + bytes(1 << 20))
    async with running_server(export(img, "disk")) as srv:
        out = await run("qemu-img", "compare", "-f", "raw", "-F", "raw", img, uri(srv, "disk"))
    assert "identical" in out
