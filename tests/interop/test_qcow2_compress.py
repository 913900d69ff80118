"""compress = true through real clients: nbdcopy/qemu-io write, qemu-img judges.

Each test writes through nbdserve (in-process server or the CLI), shuts it down
and then lets qemu-img check the refcounts (``qemu-img check`` must be clean and
count compressed clusters), map the image (qemu-img 7.2 prints compressed
clusters as data without an ``offset``; newer versions add ``"compressed":
true``) and compare the guest contents with what the clients wrote.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from nbdserve.block.qcow2 import Qcow2Driver
from nbdserve.config import load_config
from tests.conftest import require_tools
from tests.helpers.images import direct_io_supported
from tests.helpers.server import (
    export,
    run,
    running_server,
    server_process,
    unix_uri,
    uri,
)

pytestmark = pytest.mark.interop

KiB = 1024
MiB = 1024 * KiB
SIZE = 16 * MiB
CS = 64 * KiB


def compressible(rng: random.Random, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        k = rng.randrange(64, 3000)
        out += rng.randbytes(k) if rng.random() < 0.45 else bytes([rng.randrange(256)]) * k
    return bytes(out[:n])


def source_image(rng: random.Random) -> bytes:
    """Mostly compressible, some noise (stays uncompressed) and some zeros."""
    data = bytearray(compressible(rng, SIZE))
    data[3 * MiB : 4 * MiB] = rng.randbytes(MiB)
    data[9 * MiB : 10 * MiB] = bytes(MiB)
    return bytes(data)


async def _create(path: Path, compression: str) -> None:
    await run(
        "qemu-img", "create", "-q", "-f", "qcow2",
        "-o", f"compression_type={compression},cluster_size={CS}", path, str(SIZE),
    )  # fmt: skip


async def _qemu_img_json(*args: str | Path) -> Any:
    return json.loads(await run("qemu-img", *args))


async def assert_compressed_and_equal(img: Path, expected: bytes, tmp: Path) -> dict[str, Any]:
    """qemu-img check clean with compressed clusters; map shows them; contents match."""
    check: dict[str, Any] = await _qemu_img_json("check", "-f", "qcow2", "--output=json", img)
    assert check.get("corruptions", 0) == 0, check
    assert check.get("leaks", 0) == 0, check
    assert check.get("check-errors", 0) == 0, check
    assert check["compressed-clusters"] > 0, check
    mapping = await _qemu_img_json("map", "-f", "qcow2", "--output=json", img)
    compressed = [m for m in mapping if m["data"] and (m.get("compressed") or "offset" not in m)]
    assert compressed, mapping
    raw = tmp / "expected.raw"
    raw.write_bytes(expected)
    await run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", raw, img)
    return check


def _qemu_io_script(rng: random.Random, model: bytearray, tmp: Path) -> list[str]:
    """Partial writes over compressed clusters, whole-cluster rewrites, zeroing,
    discards; applied to ``model`` as the server should apply them."""
    cmds: list[str] = []
    for i in range(24):
        roll = rng.random()
        if roll < 0.4:  # partial: decompress, merge, rewrite as a normal cluster
            off = rng.randrange(SIZE - 70 * KiB)
            n = rng.randrange(1, 70 * KiB)
            pattern = rng.randrange(1, 256)
            cmds += ["-c", f"write -P {pattern} {off} {n}"]
            model[off : off + n] = bytes([pattern]) * n
        elif roll < 0.75:  # whole clusters from a file: compressed again
            off = rng.randrange(SIZE // CS - 4) * CS
            n = rng.randrange(1, 4) * CS
            data = compressible(rng, n)
            src = tmp / f"chunk{i}.bin"
            src.write_bytes(data)
            cmds += ["-c", f"write -s {src} {off} {n}"]
            model[off : off + n] = data
        elif roll < 0.88:
            off = rng.randrange(SIZE - 200 * KiB)
            n = rng.randrange(1, 200 * KiB)
            cmds += ["-c", f"write -z {off} {n}"]
            model[off : off + n] = bytes(n)
        else:  # whole-cluster discards read back as zeros (no backing file)
            off = rng.randrange(SIZE // CS - 4) * CS
            n = rng.randrange(1, 4) * CS
            cmds += ["-c", f"discard {off} {n}"]
            model[off : off + n] = bytes(n)
    cmds += ["-c", "flush"]
    return cmds


@pytest.mark.parametrize("cache", ["writeback", "none"])
@pytest.mark.parametrize("compression", ["zlib", "zstd"])
async def test_client_writes_are_stored_compressed(
    tmp_path: Path, compression: str, cache: str
) -> None:
    require_tools("qemu-img", "qemu-io", "nbdcopy")
    if cache == "none" and not direct_io_supported(tmp_path):
        pytest.skip("this file system refuses O_DIRECT")
    rng = random.Random(f"{compression}-{cache}")
    img = tmp_path / "disk.qcow2"
    await _create(img, compression)
    model = bytearray(source_image(rng))
    (tmp_path / "src.raw").write_bytes(model)
    settings = {"compress": True}
    async with running_server(
        export(img, "d", format="qcow2", cache=cache, settings=settings)
    ) as srv:
        await run("nbdcopy", tmp_path / "src.raw", uri(srv, "d"))
        await run("qemu-io", "-f", "raw", *_qemu_io_script(rng, model, tmp_path), uri(srv, "d"))
        served = tmp_path / "served.raw"
        await run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri(srv, "d"), served)
        assert srv.registry is not None
        top = srv.registry.lookup("d").chain.top  # type: ignore[union-attr]
        assert isinstance(top, Qcow2Driver)
        stats = top.statistics().extra
    assert served.read_bytes() == bytes(model)
    assert stats["compressed_clusters_written"] > 0
    assert stats["incompressible_clusters_written"] > 0  # the noise megabyte
    assert stats["compress_cache_full_writes"] > 0
    check = await assert_compressed_and_equal(img, bytes(model), tmp_path)
    info = await _qemu_img_json("info", "--output=json", img)
    assert info["format-specific"]["data"]["compression-type"] == compression
    # the image is smaller than the data it holds
    assert info["actual-size"] < 0.8 * (SIZE - MiB), (info, check)


async def test_without_the_write_cache(tmp_path: Path) -> None:
    """compress_cache_size = 0: every request writes its extents directly."""
    require_tools("qemu-img", "qemu-io", "nbdcopy")
    cache = "none" if direct_io_supported(tmp_path) else "writeback"
    rng = random.Random(3)
    img = tmp_path / "disk.qcow2"
    await _create(img, "zlib")
    model = bytearray(source_image(rng))
    (tmp_path / "src.raw").write_bytes(model)
    settings = {"compress": True, "compress_cache_size": 0}
    async with running_server(
        export(img, "d", format="qcow2", cache=cache, settings=settings)
    ) as srv:
        await run("nbdcopy", tmp_path / "src.raw", uri(srv, "d"))
        await run("qemu-io", "-f", "raw", *_qemu_io_script(rng, model, tmp_path), uri(srv, "d"))
        top = srv.registry.lookup("d").chain.top  # type: ignore[union-attr]
        assert isinstance(top, Qcow2Driver)
        assert "compress_cache_writes" not in top.statistics().extra
    await assert_compressed_and_equal(img, bytes(model), tmp_path)


async def test_a_tiny_write_cache_under_many_parallel_requests(tmp_path: Path) -> None:
    """Two cached host clusters for four connections with many requests each: writers
    hit the bound before any FLUSH (and make room or wait for it), the cache never
    holds more than two active clusters, and it recovers; data and refcounts stay right."""
    require_tools("qemu-img", "nbdcopy")
    cache = "none" if direct_io_supported(tmp_path) else "writeback"
    rng = random.Random(4)
    img = tmp_path / "disk.qcow2"
    await _create(img, "zstd")
    model = source_image(rng)
    (tmp_path / "src.raw").write_bytes(model)
    settings = {"compress": True, "compress_cache_size": 1}  # rounds up to 2 clusters
    async with running_server(
        export(img, "d", format="qcow2", cache=cache, settings=settings)
    ) as srv:
        top = srv.registry.lookup("d").chain.top  # type: ignore[union-attr]
        assert isinstance(top, Qcow2Driver)
        assert top._compress is not None
        wcache = top._compress.cache
        assert wcache is not None
        highest = 0
        bound_hits = 0  # make_room calls that found the cache at its bound
        before_flush: dict[str, int] | None = None
        append, make_room, flush = wcache.append, wcache.make_room, top.flush

        def watched_append(host: int, data: bytes) -> None:
            nonlocal highest
            append(host, data)
            highest = max(highest, wcache.active_count)

        async def watched_make_room(new_active: int) -> None:
            nonlocal bound_hits
            if not wcache.has_room(new_active):
                bound_hits += 1
            await make_room(new_active)

        async def watched_flush() -> None:
            nonlocal before_flush
            if before_flush is None:
                before_flush = {**top.statistics().extra, "bound_hits": bound_hits}
            await flush()

        wcache.append = watched_append  # type: ignore[method-assign,assignment]
        wcache.make_room = watched_make_room  # type: ignore[method-assign]
        top.flush = watched_flush  # type: ignore[method-assign]
        await run(
            "nbdcopy", "--connections=4", "--requests=32", "--request-size=65536", "--flush",
            tmp_path / "src.raw", uri(srv, "d"),
        )  # fmt: skip
        assert before_flush is not None, "nbdcopy sent no FLUSH"
        # the bound was reached and recovered from: then a second pass still works
        await run("nbdcopy", "--connections=4", tmp_path / "src.raw", uri(srv, "d"))
    print(f"tiny write cache: before the first FLUSH {before_flush}, highest active {highest}")
    assert before_flush["bound_hits"] > 0, before_flush
    assert before_flush["compress_cache_room_waits"] > 0, before_flush
    assert highest == 2
    await assert_compressed_and_equal(img, model, tmp_path)


async def test_cli_compress_flag(tmp_path: Path) -> None:
    require_tools("qemu-img", "qemu-io")
    img = tmp_path / "disk.qcow2"
    await _create(img, "zlib")
    data = compressible(random.Random(5), 4 * CS)
    (tmp_path / "chunk.bin").write_bytes(data)
    sock = tmp_path / "nbd.sock"
    with server_process(
        ["serve", "--compress", "-f", "qcow2", "-k", str(sock), str(img)],
        socket_path=str(sock),
    ):
        await run(
            "qemu-io", "-f", "raw", "-c", f"write -s {tmp_path / 'chunk.bin'} 0 {4 * CS}",
            unix_uri(sock),
        )  # fmt: skip
    expected = data + bytes(SIZE - len(data))
    check = await assert_compressed_and_equal(img, expected, tmp_path)
    assert check["compressed-clusters"] == 4


async def test_compress_as_an_export_key_of_a_config_file(tmp_path: Path) -> None:
    """``compress = true`` directly on ``[[export]]`` (not only under settings), served
    by ``nbdserve serve --config`` in a child process: a qemu-io write lands as
    compressed clusters."""
    require_tools("qemu-img", "qemu-io")
    img = tmp_path / "disk.qcow2"
    await _create(img, "zstd")
    data = compressible(random.Random(6), 4 * CS)
    (tmp_path / "chunk.bin").write_bytes(data)
    sock = tmp_path / "nbd.sock"
    cfg = tmp_path / "nbdserve.toml"
    cfg.write_text(
        f'[server]\nsocket = "{sock}"\n\n'
        f'[[export]]\nname = "d"\npath = "{img.name}"\nformat = "qcow2"\ncompress = true\n'
    )
    with server_process(["serve", "--config", str(cfg)], socket_path=str(sock)):
        await run(
            "qemu-io", "-f", "raw", "-c", f"write -s {tmp_path / 'chunk.bin'} {CS} {4 * CS}",
            "-c", "flush", unix_uri(sock, "d"),
        )  # fmt: skip
    expected = bytes(CS) + data + bytes(SIZE - 5 * CS)
    check = await assert_compressed_and_equal(img, expected, tmp_path)
    assert check["compressed-clusters"] == 4


async def test_compress_cache_size_as_an_export_key(tmp_path: Path) -> None:
    """``compress_cache_size = 0`` on ``[[export]]`` reaches the driver: no write cache."""
    require_tools("qemu-img", "qemu-io")
    img = tmp_path / "disk.qcow2"
    await _create(img, "zlib")
    cfg = tmp_path / "nbdserve.toml"
    cfg.write_text(
        f'[[export]]\nname = "d"\npath = "{img}"\nformat = "qcow2"\n'
        "compress = true\ncompress_cache_size = 0\n"
    )
    (config_export,) = load_config(str(cfg)).exports
    data = compressible(random.Random(7), 2 * CS)
    (tmp_path / "chunk.bin").write_bytes(data)
    async with running_server(config_export) as srv:
        await run("qemu-io", "-f", "raw", "-c", f"write -s {tmp_path / 'chunk.bin'} 0 {2 * CS}",
                  uri(srv, "d"))  # fmt: skip
        top = srv.registry.lookup("d").chain.top  # type: ignore[union-attr]
        assert isinstance(top, Qcow2Driver)
        stats = top.statistics().extra
    assert stats["compressed_clusters_written"] == 2
    assert "compress_cache_writes" not in stats  # the cache is off
    await assert_compressed_and_equal(img, data + bytes(SIZE - 2 * CS), tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_fio_sequential_write_throughput(tmp_path: Path) -> None:
    """The issue's measurement: fio 1 MiB sequential writes at queue depth 8 of 70 %
    compressible buffers into a fresh image with cache=none, compressed with and
    without the write cache (zlib and zstd images) and uncompressed; prints MiB/s and
    image sizes."""
    require_tools("qemu-img", "fio")
    if not direct_io_supported(tmp_path):
        pytest.skip("this file system refuses O_DIRECT")
    size = 1024 * MiB
    results = {}
    configs: list[tuple[str, str, dict[str, object]]] = [
        ("uncompressed", "zlib", {}),
        ("compress zlib+cache", "zlib", {"compress": True}),
        ("compress zlib, no cache", "zlib", {"compress": True, "compress_cache_size": 0}),
        ("compress zstd+cache", "zstd", {"compress": True}),
        ("compress zstd, no cache", "zstd", {"compress": True, "compress_cache_size": 0}),
    ]
    for name, compression, settings in configs:
        d = tmp_path / name.replace(" ", "").replace(",", "").replace("+", "-")
        d.mkdir()
        img = d / "disk.qcow2"
        await run(
            "qemu-img", "create", "-q", "-f", "qcow2", "-o", f"compression_type={compression}",
            img, str(size),
        )  # fmt: skip
        sock = d / "nbd.sock"
        lines = [f'[server]\nsocket = "{sock}"\nport = 0\n', "[[export]]", 'name = ""']
        lines += [f'path = "{img}"', 'format = "qcow2"', 'cache = "none"', "[export.settings]"]
        lines += [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
        (d / "cfg.toml").write_text("\n".join(lines) + "\n")
        with server_process(["serve", "--config", str(d / "cfg.toml")], socket_path=str(sock)):
            out = await run(
                "fio", "--name=w", "--ioengine=nbd", f"--uri={unix_uri(sock)}",
                "--rw=write", "--bs=1M", "--iodepth=8", f"--size={size}",
                "--buffer_compress_percentage=70", "--refill_buffers",
                "--output-format=json", timeout=600,
            )  # fmt: skip
        job = json.loads(out[out.index("{") :])["jobs"][0]["write"]
        check = await _qemu_img_json("check", "-f", "qcow2", "--output=json", img)
        assert check.get("corruptions", 0) == 0, check
        assert check.get("leaks", 0) == 0, check
        results[name] = (job["bw_bytes"] / MiB, img.stat().st_size / MiB)
    for name, (bw, mib) in results.items():
        print(f"fio seq write 1M qd8 cache=none {name}: {bw:.1f} MiB/s, image {mib:.1f} MiB")
    for name in ("compress zlib+cache", "compress zstd+cache"):
        assert results[name][1] < 0.5 * results["uncompressed"][1], results
