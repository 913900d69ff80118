"""Differential test: the same NBD request sequence through nbdserve and qemu-nbd.

One copy of an image is served by nbdserve, another by qemu-nbd
(``--discard=unmap`` so trims take effect); a seeded random sequence of
writes, zero writes (with and without NO_HOLE), trims and flushes is sent to
both by nbdsh.  Afterwards both copies must show identical guest content and
pass ``qemu-img check``.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import signal
import subprocess
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.conftest import require_tools
from tests.helpers.images import assert_clean, qemu_img, qemu_io
from tests.helpers.server import export, nbdsh_argv, run, running_server, unix_uri, uri

pytestmark = pytest.mark.interop

SIZE = 8 * 1024 * 1024


def _ops_script(seed: int, count: int, cluster: int) -> str:
    """A Python script for nbdsh: ``h`` is the connected handle."""
    rng = random.Random(seed)
    lines = ["import nbd"]
    for _ in range(count):
        off = rng.randrange(SIZE)
        if rng.random() < 0.4:
            off = off // cluster * cluster
        length = rng.randint(1, min(4 * cluster, SIZE - off))
        op = rng.random()
        if op < 0.5:
            lines.append(f"h.pwrite(bytes([{rng.randrange(1, 256)}]) * {length}, {off})")
        elif op < 0.65:
            lines.append(f"h.zero({length}, {off}, 0)")
        elif op < 0.8:
            lines.append(f"h.zero({length}, {off}, nbd.CMD_FLAG_NO_HOLE)")
        elif op < 0.93:
            lines.append(f"h.trim({length}, {off})")
        else:
            lines.append("h.flush()")
    lines.append("h.flush()")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _qemu_nbd(image: Path, sock: Path) -> Iterator[None]:
    proc = subprocess.Popen(
        [
            "qemu-nbd",
            "-f",
            "qcow2",
            "--discard=unmap",
            "--cache=writeback",
            "-k",
            str(sock),
            str(image),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"qemu-nbd did not start: {proc.stderr}")
            time.sleep(0.02)
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


def _image(kind: str, d: Path) -> Path:
    """The starting image (its backing files live next to it)."""
    path = d / "start.qcow2"
    if kind == "plain":
        qemu_img("create", "-q", "-f", "qcow2", path, str(SIZE))
        qemu_io(path, "write -P 1 0 1m")
    elif kind == "extl2":
        qemu_img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", path, str(SIZE))
        qemu_io(path, "write -P 2 4k 100k", "write -z 1m 64k")
    elif kind == "snapshot":
        qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", path, str(SIZE))
        qemu_io(path, "write -P 3 0 2m")
        qemu_img("snapshot", "-c", "s1", path)
    elif kind == "chain":
        qemu_img("create", "-q", "-f", "qcow2", d / "base.qcow2", str(SIZE))
        qemu_io(d / "base.qcow2", "write -P 4 0 8m")
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", path)
        qemu_io(path, "write -P 5 3m 1m")
    return path


@pytest.mark.parametrize(
    ("kind", "count"), [("plain", 150), ("extl2", 150), ("snapshot", 150), ("chain", 150)]
)
async def test_same_requests_same_result_as_qemu_nbd(tmp_path: Path, kind: str, count: int) -> None:
    # a stable seed (hash() of a str changes with PYTHONHASHSEED on every run)
    await _differential(tmp_path, kind, count, seed=zlib.crc32(kind.encode()) & 0xFFFF)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["plain", "extl2", "snapshot", "chain"])
async def test_same_requests_same_result_as_qemu_nbd_long(tmp_path: Path, kind: str) -> None:
    for seed in range(5):
        sub = tmp_path / str(seed)
        sub.mkdir()
        await _differential(sub, kind, 2000, seed)


async def _differential(d: Path, kind: str, count: int, seed: int) -> None:
    require_tools("qemu-img", "qemu-io", "qemu-nbd")
    print(f"differential {kind}: seed {seed}, {count} requests")
    try:
        await _differential_run(d, kind, count, seed)
    except Exception as exc:
        exc.add_note(f"differential {kind}: seed {seed}, {count} requests (ops in {d}/ops.py)")
        raise


async def _differential_run(d: Path, kind: str, count: int, seed: int) -> None:
    start = _image(kind, d)
    ours, theirs = d / "ours.qcow2", d / "theirs.qcow2"
    shutil.copy(start, ours)
    shutil.copy(start, theirs)
    cluster = json.loads(qemu_img("info", "--output=json", start))["cluster-size"]
    script = d / "ops.py"
    script.write_text(_ops_script(seed, count, cluster))
    run_script = f"exec(open({str(script)!r}).read())"
    async with running_server(export(ours, "x", format="qcow2")) as srv:
        await run(*nbdsh_argv(), "-u", uri(srv, "x"), "-c", run_script, timeout=120)
    sock = d / "qemu.sock"
    with _qemu_nbd(theirs, sock):
        await run(*nbdsh_argv(), "-u", unix_uri(sock), "-c", run_script, timeout=120)
    assert_clean(ours)
    assert_clean(theirs)
    qemu_img("compare", "-f", "qcow2", "-F", "qcow2", ours, theirs)
    changed = await trio.run_process(["qemu-img", "compare", "-q", start, ours], check=False)
    assert changed.returncode == 1, "the request sequence changed nothing"
    if kind == "snapshot":  # the snapshot still reads as it was
        for p in (ours, theirs):
            qemu_img("convert", "-l", "snapshot.name=s1", "-O", "raw", p, d / f"{p.stem}.s1")
        assert (d / "ours.s1").read_bytes() == (d / "theirs.s1").read_bytes()
