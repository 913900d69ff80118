"""scale: the cost curve of serving sparse images from 1 GiB to 16 TiB (issue 10).

Run from the repository root (not part of the test run)::

    python -m tests.bench.scale [--sizes 1G,64G,1T,16T] [--formats qcow2,parallels,fvd]
                                [--pieces 100] [--piece 1M] [--repeat 3] [--copy-max 1T]

For every format and virtual size it builds an image holding ``pieces`` x
``piece`` bytes (default 100 x 1 MiB) spread over the whole disk -- qcow2
(64 KiB clusters) and parallels (1 MiB clusters) with ``qemu-img create`` +
``qemu-io`` writes, FVD as a compact ``nbdserve img create`` overlay over a
qcow2 base, half of the pieces in each -- and prints one markdown table row:

* open: ``open_chain`` of the image in a fresh process, imports already done
  (best of ``repeat``);
* RSS: the server process (``nbdserve serve -r``) right after it listens,
  and again after the map and the copies (steady state);
* map: ``nbdinfo --map`` over the whole disk (best of ``repeat``);
* nbdcopy / convert: ``nbdcopy`` and ``qemu-img convert -O raw`` of the
  export into a sparse file (best of ``repeat``; up to ``--copy-max``);
* convert of the file: ``qemu-img convert`` of the image file itself, no
  NBD and no nbdserve (qcow2 and parallels): what the copy costs the client
  alone, the floor for the two columns before it.

A last row per format is the reference for the copy criterion: the same data
in an image of exactly the data's size.  Timing is wall clock on whatever
machine runs it; ``tests/scale`` checks the same properties as counts.

``--exports N`` measures instead one server with N exports from one config
file (16 TiB qcow2 and parallels images, 64 GiB FVD images -- a 16 TiB FVD
holds a 64 MiB table of 0xFF bytes that no copy can make sparse): startup
time, idle RSS, RSS per export over a one-export server, and the time of
``nbdinfo --list``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from tests.scale.costs import make_image, packed, spread

REPO_ROOT = Path(__file__).resolve().parents[2]
UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
SUFFIX = {"qcow2": "qcow2", "parallels": "img", "fvd": "fvd"}

OPEN_PROBE = """
import sys, time, trio
from nbdserve.block.chain import ChainOptions, open_chain

async def main(path, repeat):
    best = None
    for _ in range(repeat + 1):  # the first round pays for imports and cold caches
        t = time.perf_counter()
        chain = await open_chain(path, ChainOptions(read_only=True))
        dt = time.perf_counter() - t
        await chain.aclose()
        best = dt if best is None else min(best, dt)
    print(best)

trio.run(main, sys.argv[1], int(sys.argv[2]))
"""


def parse_size(text: str) -> int:
    text = text.strip().upper().rstrip("B").rstrip("I")
    if text[-1] in UNITS:
        return int(float(text[:-1]) * UNITS[text[-1]])
    return int(text)


def human(size: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if size >= UNITS[unit] and size % UNITS[unit] == 0:
            return f"{size // UNITS[unit]} {unit}iB"
    return f"{size} B"


QEMU_READS = ("qcow2", "parallels")  # formats qemu-img can open itself (not FVD)


@dataclass
class Row:
    fmt: str
    label: str
    open_ms: float
    rss_open: float
    rss_after: float
    map_s: float
    nbdcopy_s: float | None
    convert_s: float | None
    direct_s: float | None

    def markdown(self) -> str:
        def secs(v: float | None) -> str:
            return "—" if v is None else f"{v:.2f}"

        return (
            f"| {self.fmt} | {self.label} | {self.open_ms:.1f} | {self.rss_open:.0f} | "
            f"{self.rss_after:.0f} | {secs(self.map_s)} | {secs(self.nbdcopy_s)} | "
            f"{secs(self.convert_s)} | {secs(self.direct_s)} |"
        )


HEADER = (
    "| format | virtual size | open (ms) | RSS after open (MiB) | RSS after map+copy (MiB) "
    "| nbdinfo --map (s) | nbdcopy (s) | qemu-img convert (s) "
    "| qemu-img convert of the file, no NBD (s) |\n"
    "|---|---|---:|---:|---:|---:|---:|---:|---:|"
)


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def best_time(argv: list[str], repeat: int, cleanup: Path | None = None) -> float:
    best = float("inf")
    for _ in range(repeat):
        if cleanup is not None and cleanup.exists():
            cleanup.unlink()
        t = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        best = min(best, time.perf_counter() - t)
    if cleanup is not None and cleanup.exists():
        cleanup.unlink()
    return best


def open_time(path: Path, repeat: int) -> float:
    out = subprocess.run(
        [sys.executable, "-c", OPEN_PROBE, str(path), str(repeat)],
        check=True,
        capture_output=True,
        text=True,
        env=env(),
    )
    return float(out.stdout.strip()) * 1000


def measure(fmt: str, label: str, path: Path, args: argparse.Namespace, copy: bool) -> Row:
    work = path.parent
    sock = work / "nbd.sock"
    if sock.exists():
        sock.unlink()
    server = subprocess.Popen(
        [sys.executable, "-m", "nbdserve", "serve", "-r", "-k", str(sock), str(path)],
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server for {path} did not start")
            time.sleep(0.01)
        rss_open = rss_mib(server.pid)
        uri = f"nbd+unix:///?socket={sock}"
        map_s = best_time(["nbdinfo", "--map", uri], args.repeat)
        out = work / "copy.raw"
        nbdcopy_s = convert_s = direct_s = None
        if copy:
            nbdcopy_s = best_time(["nbdcopy", uri, str(out)], args.repeat, cleanup=out)
            convert_s = best_time(
                ["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(out)],
                args.repeat,
                cleanup=out,
            )
            if fmt in QEMU_READS:
                # the same copy by qemu-img from the image file itself: the floor
                # that no server can beat, for comparison with the reference row
                direct_s = best_time(
                    ["qemu-img", "convert", "-f", fmt, "-O", "raw", str(path), str(out)],
                    args.repeat,
                    cleanup=out,
                )
        rss_after = rss_mib(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return Row(
        fmt,
        label,
        open_time(path, args.repeat),
        rss_open,
        rss_after,
        map_s,
        nbdcopy_s,
        convert_s,
        direct_s,
    )


def run_format(fmt: str, args: argparse.Namespace, root: Path) -> list[Row]:
    rows = []
    piece = parse_size(args.piece)
    for size_text in args.sizes.split(","):
        size = parse_size(size_text)
        work = Path(tempfile.mkdtemp(prefix=f"{fmt}-", dir=root))
        try:
            path = work / f"image.{SUFFIX[fmt]}"
            trio.run(make_image, fmt, path, size, spread(size, args.pieces, piece))
            copy = size <= parse_size(args.copy_max)
            rows.append(measure(fmt, human(size), path, args, copy))
            print(rows[-1].markdown(), file=sys.stderr, flush=True)
        finally:
            shutil.rmtree(work)
    # the copy criterion's reference: the same data, nothing else
    work = Path(tempfile.mkdtemp(prefix=f"{fmt}-ref-", dir=root))
    try:
        data = args.pieces * piece
        path = work / f"image.{SUFFIX[fmt]}"
        trio.run(make_image, fmt, path, data, packed(args.pieces, piece, piece))
        rows.append(measure(fmt, f"{human(data)} (data only)", path, args, True))
        print(rows[-1].markdown(), file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work)
    return rows


def sparse_copy(src: Path, dst: Path, block: int = 1 << 20) -> None:
    """Copy ``src`` leaving all-zero blocks as holes (qemu-img fallocates a parallels
    BAT: plain copies of a 16 TiB image would each take 64 MiB of disk)."""
    zero = bytes(block)
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        size = os.fstat(fi.fileno()).st_size
        pos = 0
        while pos < size:
            chunk = fi.read(block)
            if chunk != zero[: len(chunk)]:
                fo.seek(pos)
                fo.write(chunk)
            pos += len(chunk)
        fo.truncate(size)


def serve_config(config: Path, sock: Path) -> tuple[subprocess.Popen[bytes], float]:
    if sock.exists():
        sock.unlink()
    t = time.perf_counter()
    server = subprocess.Popen(
        [sys.executable, "-m", "nbdserve", "serve", "--config", str(config)],
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while not sock.exists():
        if server.poll() is not None:
            raise RuntimeError("server did not start")
        time.sleep(0.01)
    return server, time.perf_counter() - t


def exports_row(fmt: str, size: int, count: int, args: argparse.Namespace, root: Path) -> str:
    work = Path(tempfile.mkdtemp(prefix=f"{fmt}-exports-", dir=root))
    try:
        first = work / f"e0.{SUFFIX[fmt]}"
        trio.run(make_image, fmt, first, size, spread(size, 4, 1 << 20))
        paths = [first]
        for i in range(1, count):
            paths.append(work / f"e{i}.{SUFFIX[fmt]}")
            sparse_copy(first, paths[-1])
        sock = work / "nbd.sock"
        rss = []
        for n in (1, count):
            lines = ["[server]", f'socket = "{sock}"', ""]
            for i, path in enumerate(paths[:n]):
                lines += ["[[export]]", f'name = "e{i}"', f'path = "{path}"']
                lines += ["read_only = true", ""]
            config = work / "config.toml"
            config.write_text("\n".join(lines))
            server, startup = serve_config(config, sock)
            try:
                time.sleep(0.5)
                rss.append(rss_mib(server.pid))
                listing = best_time(
                    ["nbdinfo", "--list", "--json", f"nbd+unix:///?socket={sock}"], args.repeat
                )
            finally:
                server.terminate()
                server.wait(timeout=30)
        per_export = (rss[1] - rss[0]) * 1024 / (count - 1)
        return (
            f"| {fmt} | {human(size)} | {count} | {startup:.2f} | {rss[0]:.0f} | {rss[1]:.0f} "
            f"| {per_export:.0f} | {listing:.2f} |"
        )
    finally:
        shutil.rmtree(work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1G,64G,1T,16T")
    parser.add_argument("--formats", default="qcow2,parallels,fvd")
    parser.add_argument("--pieces", type=int, default=100)
    parser.add_argument("--piece", default="1M")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--copy-max", default="1T", help="largest size to copy")
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--exports", type=int, default=0, help="measure N exports instead")
    args = parser.parse_args()
    for tool in ("qemu-img", "qemu-io", "nbdinfo", "nbdcopy"):
        if shutil.which(tool) is None:
            sys.exit(f"scale: {tool} is needed")
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="nbdserve-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    export_rows: list[str] = []
    try:
        for fmt in args.formats.split(","):
            if args.exports:
                size = parse_size("64G" if fmt == "fvd" else "16T")
                export_rows.append(exports_row(fmt, size, args.exports, args, root))
                print(export_rows[-1], file=sys.stderr, flush=True)
            else:
                rows += run_format(fmt, args, root)
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    if args.exports:
        print(
            "| format | virtual size | exports | startup (s) | RSS, 1 export (MiB) "
            "| RSS, all (MiB) | per export (KiB) | nbdinfo --list (s) |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|"
        )
        print("\n".join(export_rows))
        return
    print(
        f"{args.pieces} x {args.piece} of data spread over each disk; "
        f"best of {args.repeat}; {os.cpu_count()} CPUs\n"
    )
    print(HEADER)
    for row in rows:
        print(row.markdown())


if __name__ == "__main__":
    main()
