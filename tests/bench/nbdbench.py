"""nbdbench: benchmark nbdserve against reference NBD servers with fio's nbd engine.

Run from the repository root, either way:

    python -m tests.bench.nbdbench COMMAND ...
    python tests/bench/nbdbench.py COMMAND ...

Commands
--------
prepare          make the scratch images in --dir: base.raw (random data), fully
                 allocated copies base.qcow2 (64 KiB clusters), base.parallels and
                 base.fvd (created by ``nbdserve img create`` and filled through an
                 nbdserve export), every one checked against base.raw through nbdserve,
                 plus the working copies bench.FMT that the servers export.
compare          for every round, format and workload, start each server in turn,
                 run that one workload, stop it (A B C A B C ...), so that the noise
                 of a shared machine hits all servers alike. Prints the figures and
                 the ratio of the subject (nbdserve) to the best peer per workload.
memory           "many clients" mode: N fio jobs (= N NBD connections) at QD M
                 against one server; reports its RSS idle, steady, peak and after.
neighbour        disk reads that miss the page cache must not stall other clients:
                 a QD1 client reading a cached region alone, a QD16 client reading a
                 region kept out of the page cache alone, then both at once; shows
                 the hot client's IOPS and p99 latency with and without the cold one.
report           re-print the tables of one or more --json-out files.
profile-summary  top functions (self and inclusive) of a py-spy ``-f raw`` profile;
                 ``compare --profile DIR`` writes one per subject unit.
presets          list the built-in servers.

Only the standard library is used, so the script runs without the project's
environment; the subject server runs with PYTHONPATH=--nbdserve-src (default: this
checkout). Missing images are prepared on demand by compare and memory.

Design notes
------------
* One server process per (server, format, workload, round): a server never carries
  the state of the previous workload (caches, buffers) into the next one, and the
  interleaving spreads slow drifts in machine load over all servers.
* The image is read once before every job so that every server starts from a warm
  page cache; ``os.sync()`` before every job so that write-back of the previous
  write job does not land in the next one.
* CPU is the server's process tree (user+sys from /proc, 100 = one core); "other"
  is the machine's busy time minus server and fio: kernel threads and the other
  tenants of the machine, a noise indicator.
* RSS is sampled every 0.2 s from /proc/PID/statm during the job: "steady" is the
  median of the second half of the samples, "peak" the maximum.
* Ratios are computed per round (same minute, same noise) and the median is shown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

REPO_ROOT = Path(__file__).resolve().parents[2]
MIB = 1 << 20
GIB = 1 << 30
DEFAULT_DIR = Path(tempfile.gettempdir()) / "nbdbench"
DEFAULT_EXPORT = "bench"
FORMATS = ("raw", "qcow2", "parallels", "fvd")
Record = dict[str, Any]


@dataclass(frozen=True)
class Workload:
    name: str
    rw: str
    bs: str
    iodepth: int
    numjobs: int = 1

    @property
    def writes(self) -> bool:
        return "write" in self.rw


WORKLOADS = (
    Workload("seqread-1m-qd8", "read", "1m", 8),
    Workload("seqwrite-1m-qd8", "write", "1m", 8),
    Workload("randread-4k-qd1", "randread", "4k", 1),
    Workload("randread-4k-qd16", "randread", "4k", 16),
    Workload("randwrite-4k-qd16", "randwrite", "4k", 16),
    Workload("randread-64k-qd16", "randread", "64k", 16),
    Workload("randread-4k-qd16-2conn", "randread", "4k", 16, numjobs=2),
    # clients at queue depth 1 must not wait for each other (the session's poll)
    Workload("randread-4k-qd1-2conn", "randread", "4k", 1, numjobs=2),
)


def memory_workloads(clients: int, iodepth: int) -> tuple[Workload, ...]:
    tail = f"qd{iodepth}-{clients}conn"
    return (
        Workload(f"randread-4k-{tail}", "randread", "4k", iodepth, clients),
        Workload(f"randread-1m-{tail}", "randread", "1m", iodepth, clients),
        Workload(f"randwrite-1m-{tail}", "randwrite", "1m", iodepth, clients),
    )


@dataclass(frozen=True)
class ServerSpec:
    name: str
    cmd: str
    formats: tuple[str, ...] | None  # formats it is run for; None: every format
    doc: str = ""
    subject: bool = False


_NBDKIT = "nbdkit -f -p {port} -i 127.0.0.1 -e {export}"
_QEMU_NBD = "qemu-nbd -f {fmt} -x {export} -b 127.0.0.1 -p {port} -t -e 64"
PRESETS = {
    "nbdserve": ServerSpec(
        "nbdserve",
        "{python} -m nbdserve -q serve --format {fmt} --export {export} "
        "--bind 127.0.0.1 --port {port} {image}",
        FORMATS,
        "this project, run with PYTHONPATH=--nbdserve-src",
        subject=True,
    ),
    "qemu-nbd": ServerSpec(
        "qemu-nbd",
        _QEMU_NBD + " {image}",
        ("raw", "qcow2", "parallels"),
        "qemu-nbd defaults (cache=writeback, aio=threads)",
    ),
    "qemu-nbd-direct": ServerSpec(
        "qemu-nbd-direct",
        _QEMU_NBD + " --cache=none --aio=native {image}",
        ("qcow2",),
        "qemu-nbd with O_DIRECT and linux-aio (bypasses the page cache)",
    ),
    "nbdkit-file": ServerSpec(
        "nbdkit-file", _NBDKIT + " file {image}", ("raw",), "nbdkit file plugin (C, parallel)"
    ),
    "nbdkit-null": ServerSpec(
        "nbdkit-null",
        _NBDKIT + " null {size}",
        ("raw",),
        "protocol ceiling: nbdkit null plugin (no data; not run by default)",
    ),
}
DEFAULT_SERVERS = ("nbdserve", "qemu-nbd", "qemu-nbd-direct", "nbdkit-file")


# ---------------------------------------------------------------------------
# small helpers


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r}")
    return int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[m.group(2).lower()]


def first_line(argv: Sequence[str]) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable ({e.__class__.__name__})"
    lines = (p.stdout or p.stderr).strip().splitlines()
    return lines[0] if lines else ""


def _read_or_unavailable(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as e:
        return f"unavailable ({e.__class__.__name__})"


def git_head(src: Path) -> str:
    """`git describe` of the nbdserve source, or the content of a COMMIT file beside it."""
    try:
        return (src / "COMMIT").read_text().strip()
    except OSError:
        pass
    p = subprocess.run(
        ["git", "-C", str(src), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    )
    return p.stdout.strip() if p.returncode == 0 else "unknown"


def versions(args: argparse.Namespace) -> dict[str, Any]:
    v: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nproc": os.cpu_count(),
        "fio": first_line(["fio", "--version"]),
        "qemu-nbd": first_line(["qemu-nbd", "--version"]),
        "nbdkit": first_line(["nbdkit", "--version"]),
        "libnbd": first_line(["nbdinfo", "--version"]),
        "nbdserve_src": str(args.nbdserve_src),
        "nbdserve_git": git_head(args.nbdserve_src),
        # the host's default for TCP connections: BBR paces sends, which
        # large reads over loopback feel (README, "Large reads")
        "tcp_congestion": _read_or_unavailable("/proc/sys/net/ipv4/tcp_congestion_control"),
    }
    try:
        with open("/proc/cpuinfo") as f:
            v["cpu"] = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
        with open("/proc/meminfo") as f:
            v["mem_total"] = f.readline().split(":", 1)[1].strip()
    except (OSError, StopIteration):
        pass
    return v


def listening(port: int) -> bool:
    """True if some socket LISTENs on TCP `port`, per /proc/net/tcp{,6}."""
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                        return True
        except OSError:
            continue
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_stat(pid: int) -> tuple[int, str, int] | None:
    """(ppid, state, utime+stime+cutime+cstime ticks) of `pid`, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rindex(")") + 2 :].split()
    return int(rest[1]), rest[0], sum(int(x) for x in rest[11:15])


def process_table() -> dict[int, tuple[int, str, int]]:
    table = {}
    for d in os.listdir("/proc"):
        if d.isdigit() and (st := proc_stat(int(d))):
            table[int(d)] = st
    return table


def tree_pids(root: int) -> list[int]:
    table = process_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root] if root in table else []
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds (user+sys, incl. reaped children) of `root` and its descendants."""
    table = process_table()
    return sum(table[p][2] for p in tree_pids(root) if p in table) / os.sysconf("SC_CLK_TCK")


def rss_mib(pids: Iterable[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total * os.sysconf("SC_PAGE_SIZE") / MIB


def sys_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + vals[4]
    return sum(vals) - idle, sum(vals)


def alive(pid: int | None) -> bool:
    st = proc_stat(pid) if pid else None
    return st is not None and st[1] not in ("Z", "X")


def warm(path: Path, offset: int, length: int) -> None:
    """Read a range of the file once so that it sits in the page cache."""
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        buf = bytearray(8 * MIB)
        left = length
        while left > 0:
            n = f.readinto(memoryview(buf)[: min(left, len(buf))])
            if not n:
                break
            left -= n


def prewarm(path: Path) -> None:
    """Read the whole file once so that it sits in the page cache."""
    try:
        warm(path, 0, path.stat().st_size)
    except OSError:
        pass


def meminfo_mib(field: str) -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def fmt_num(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def fmt_k(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x / 1000:.1f}k" if x >= 1000 else f"{x:.0f}"


# ---------------------------------------------------------------------------
# servers


class ServerError(RuntimeError):
    pass


def parse_server(spec: str) -> ServerSpec:
    """PRESET | NAME=PRESET | NAME=TEMPLATE (a custom template runs for every format)."""
    if spec in PRESETS:
        return PRESETS[spec]
    m = re.fullmatch(r"([A-Za-z0-9_.+-]+)=(.+)", spec, re.S)
    if not m:
        raise SystemExit(f"--server {spec!r}: expected PRESET or NAME=TEMPLATE")
    name, template = m.groups()
    if template in PRESETS:
        p = PRESETS[template]
        return ServerSpec(name, p.cmd, p.formats, p.doc, p.subject)
    return ServerSpec(name, template, None, "custom")


class Server:
    """One server process on 127.0.0.1:PORT; started, probed, measured, stopped."""

    def __init__(
        self, spec: ServerSpec, fmt: str, image: Path, args: argparse.Namespace, tag: str
    ) -> None:
        self.spec, self.fmt, self.image, self.args = spec, fmt, image, args
        logdir = args.dir / "logs"
        logdir.mkdir(parents=True, exist_ok=True)
        self.logpath = logdir / f"{spec.name}-{fmt}-{tag}.log"
        ctx = {
            "fmt": fmt,
            "port": args.port,
            "image": shlex.quote(str(image)),
            "export": args.export,
            "dir": shlex.quote(str(args.dir)),
            "python": shlex.quote(sys.executable),
            "size": str(image.stat().st_size if image.exists() else GIB),
        }
        try:
            self.cmdline = spec.cmd.format_map(ctx)
        except KeyError as e:
            raise ServerError(f"unknown placeholder {e} in {spec.cmd!r}") from None
        self.profile_path: Path | None = None
        if spec.subject and getattr(args, "profile", None):
            self.profile_path = Path(args.profile) / f"{spec.name}-{fmt}-{tag}.txt"
        self.proc: subprocess.Popen[bytes] | None = None
        self.logf: IO[str] | None = None
        self.pids: list[int] = []
        self.export_size: int | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.args.port}/{self.args.export}"

    def argv(self) -> list[str]:
        argv = shlex.split(self.cmdline)
        if self.profile_path:
            self.profile_path.parent.mkdir(parents=True, exist_ok=True)
            rate = str(self.args.profile_rate)
            pyspy = ["py-spy", "record", "-r", rate, "-f", "raw", "-o", str(self.profile_path)]
            argv = [*pyspy, "--", *argv]
        if self.args.pin_server:
            argv = ["taskset", "-c", self.args.pin_server, *argv]
        return argv

    def env(self) -> dict[str, str]:
        return nbdserve_env(self.args, subject=self.spec.subject)

    def start(self) -> None:
        port = self.args.port
        deadline = time.monotonic() + 10
        while listening(port):
            if time.monotonic() > deadline:
                raise ServerError(f"port {port} already in use")
            time.sleep(0.1)
        argv = self.argv()
        self.logf = open(self.logpath, "w")  # noqa: SIM115 - closed in stop()
        self.logf.write("$ " + shlex.join(argv) + "\n")
        self.logf.flush()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self.logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=self.env(),
        )
        deadline = time.monotonic() + self.args.start_timeout
        while not listening(port):
            if self.proc.poll() is not None:
                raise ServerError(f"exited with {self.proc.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise ServerError(f"not listening on {port} after {self.args.start_timeout}s")
            time.sleep(0.05)
        self.probe()
        self.pids = tree_pids(self.proc.pid)

    def probe(self) -> None:
        """nbdinfo --size: the export answers a real handshake (not just a listen())."""
        if not shutil.which("nbdinfo"):
            return
        try:
            p = subprocess.run(
                ["nbdinfo", "--size", self.uri()],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise ServerError("nbdinfo probe timed out") from None
        if p.returncode != 0:
            raise ServerError(f"nbdinfo probe failed: {p.stderr.strip()} | {self.log_tail()}")
        self.export_size = int(p.stdout.strip())

    def log_tail(self, n: int = 5) -> str:
        try:
            lines = self.logpath.read_text(errors="replace").strip().splitlines()[1:]
        except OSError:
            return ""
        return " / ".join(lines[-n:])

    def stop(self) -> None:
        proc = self.proc
        if proc and proc.poll() is None:
            if self.profile_path:
                # py-spy writes its profile when the profiled child exits: end the
                # child first, never py-spy itself.
                for pid in tree_pids(proc.pid)[1:]:
                    try:
                        os.kill(pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
            else:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            try:
                proc.wait(self.args.stop_timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.spec.name}: no exit {self.args.stop_timeout}s after SIGTERM: SIGKILL")
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(10)
        deadline = time.monotonic() + 10
        while listening(self.args.port) and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.logf:
            self.logf.close()
            self.logf = None


# ---------------------------------------------------------------------------
# images


def base_image(d: Path, fmt: str) -> Path:
    return d / f"base.{fmt}"


def bench_image(d: Path, fmt: str) -> Path:
    return d / f"bench.{fmt}"


def manifest_path(d: Path) -> Path:
    return d / "images.json"


def load_manifest(d: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(manifest_path(d).read_text())
        return data
    except (OSError, ValueError):
        return {"size": None, "formats": {}}


def run_checked(argv: Sequence[str], timeout: float = 900) -> str:
    log("$ " + shlex.join(argv))
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {p.returncode}: {(p.stderr or p.stdout).strip()}")
    return p.stdout


def write_random(path: Path, size: int) -> None:
    log(f"writing {size} random bytes to {path}")
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        left = size
        while left:
            n = min(left, 4 * MIB)
            f.write(os.urandom(n))
            left -= n
    os.replace(tmp, path)


def copy_image(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def nbdserve_cmd(*argv: str) -> list[str]:
    return [sys.executable, "-m", "nbdserve", *argv]


def nbdserve_env(args: argparse.Namespace, *, subject: bool = True) -> dict[str, str]:
    """The environment of a server (or tool) process; ``subject``: run --nbdserve-src."""
    env = dict(os.environ)
    if subject:
        src = str(args.nbdserve_src)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    # `python -m` would put the current directory first on sys.path: run from a
    # checkout, a server would be that checkout's whatever PYTHONPATH says
    env["PYTHONSAFEPATH"] = "1"
    return env


def with_nbdserve(args: argparse.Namespace, fmt: str, image: Path, argv: Sequence[str]) -> str:
    """Run `argv` (``{uri}`` replaced) against image served by nbdserve; return stdout."""
    srv = Server(PRESETS["nbdserve"], fmt, image, args, "prepare")
    try:
        srv.start()
        return run_checked([a.replace("{uri}", srv.uri()) for a in argv])
    finally:
        srv.stop()


def make_fvd(args: argparse.Namespace, raw: Path, out: Path, size: int) -> None:
    """Create an FVD image without base and fill it with raw's data through nbdserve."""
    tmp = out.with_name(out.name + ".tmp")
    tmp.unlink(missing_ok=True)
    p = subprocess.run(
        nbdserve_cmd("img", "create", "-q", "-f", "fvd", str(tmp), str(size)),
        capture_output=True,
        text=True,
        env=nbdserve_env(args),
        check=False,
    )
    if p.returncode != 0:
        raise RuntimeError(f"nbdserve img create -f fvd: {(p.stderr or p.stdout).strip()}")
    if shutil.which("nbdcopy"):
        fill = ["nbdcopy", "--flush", str(raw), "{uri}"]
    else:
        fill = ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(raw), "{uri}"]
    with_nbdserve(args, "fvd", tmp, fill)
    check = subprocess.run(
        nbdserve_cmd("img", "check", str(tmp)),
        capture_output=True,
        text=True,
        env=nbdserve_env(args),
        check=False,
    )
    if check.returncode != 0:
        raise RuntimeError(f"nbdserve img check after fill: {check.stdout.strip()}")
    os.replace(tmp, out)


# nbdsh script: copy the raw image into the export one 64 KiB cluster at a time in a
# shuffled (seeded) order, so a qcow2 allocates its clusters scattered over the file
# as a guest's random writes leave them
_SCATTER_SCRIPT = """
import random
order = list(range(h.get_size() // 65536))
random.Random(7).shuffle(order)
with open(RAW, "rb") as f:
    for i in order:
        f.seek(i * 65536)
        h.pwrite(f.read(65536), i * 65536)
h.flush()
"""


def make_scattered_qcow2(args: argparse.Namespace, raw: Path, out: Path, size: int) -> None:
    tmp = out.with_name(out.name + ".tmp")
    opts = ["-o", "cluster_size=65536"]
    run_checked(["qemu-img", "create", "-q", "-f", "qcow2", *opts, str(tmp), str(size)])
    script = f"RAW = {str(raw)!r}\n" + _SCATTER_SCRIPT
    # nbdsh is the system Python's `-m nbd` (python3-libnbd is built for that Python)
    nbdsh = ["/usr/bin/python3", "-m", "nbd"] if os.path.exists("/usr/bin/python3") else ["nbdsh"]
    with_nbdserve(args, "qcow2", tmp, [*nbdsh, "-u", "{uri}", "-c", script])
    os.replace(tmp, out)


def qcow2_layout(entry: dict[str, Any], fmt: str) -> str | None:
    return entry.get("layout", "sequential") if fmt == "qcow2" else None


def make_base(args: argparse.Namespace, fmt: str, size: int) -> None:
    d: Path = args.dir
    raw, out = base_image(d, "raw"), base_image(d, fmt)
    tmp = out.with_name(out.name + ".tmp")
    if fmt == "qcow2" and args.qcow2_layout == "scattered":
        make_scattered_qcow2(args, raw, out, size)
    elif fmt == "qcow2":
        opts = ["-o", "cluster_size=65536"]
        run_checked(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", *opts, str(raw), str(tmp)])
        os.replace(tmp, out)
    elif fmt == "parallels":
        run_checked(["qemu-img", "convert", "-f", "raw", "-O", "parallels", str(raw), str(tmp)])
        os.replace(tmp, out)
    elif fmt == "fvd":
        make_fvd(args, raw, out, size)


def verify_base(args: argparse.Namespace, fmt: str) -> None:
    """Every byte allocated and equal to base.raw, as nbdserve serves it."""
    d: Path = args.dir
    image = base_image(d, fmt)
    if fmt in ("qcow2", "parallels"):
        extents = json.loads(
            run_checked(["qemu-img", "map", "--output=json", "-f", fmt, str(image)])
        )
        holes = [e for e in extents if not e.get("data") or e.get("zero")]
        if holes:
            raise RuntimeError(f"{image}: {len(holes)} unallocated or zero extents")
    if fmt != "raw" and args.verify:
        compare = ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(base_image(d, "raw"))]
        with_nbdserve(args, fmt, image, [*compare, "{uri}"])


def prepare_images(args: argparse.Namespace, formats: Sequence[str], force: bool) -> None:
    d: Path = args.dir
    d.mkdir(parents=True, exist_ok=True)
    size: int = args.size
    man = load_manifest(d)
    raw = base_image(d, "raw")
    if force or man.get("size") != size or not raw.exists() or raw.stat().st_size != size:
        write_random(raw, size)
        man = {"size": size, "formats": {}}
    for fmt in ["raw", *[f for f in formats if f != "raw"]]:
        entry = man["formats"].get(fmt, {})
        layout = args.qcow2_layout if fmt == "qcow2" else None
        same_layout = qcow2_layout(entry, fmt) == layout
        if entry.get("ok") and base_image(d, fmt).exists() and same_layout and not force:
            continue
        try:
            make_base(args, fmt, size)
            verify_base(args, fmt)
            copy_image(base_image(d, fmt), bench_image(d, fmt))
            man["formats"][fmt] = {"ok": True, **({"layout": layout} if layout else {})}
            log(f"{fmt}: ready ({base_image(d, fmt).stat().st_size} bytes)")
        except (RuntimeError, OSError, ServerError, subprocess.TimeoutExpired) as e:
            man["formats"][fmt] = {"ok": False, "error": str(e)}
            log(f"{fmt}: FAILED, skipped: {e}")
        manifest_path(d).write_text(json.dumps(man, indent=1))
    os.sync()


def usable_formats(args: argparse.Namespace) -> list[str]:
    """The requested formats whose images exist (preparing the missing ones)."""
    wanted = args.format or list(FORMATS)
    man = load_manifest(args.dir)
    if args.size is None:
        args.size = man.get("size") or GIB
    if man.get("size") != args.size:
        prepare_images(args, wanted, force=False)
    else:
        entries = man["formats"]
        missing = [
            f
            for f in wanted
            if not entries.get(f, {}).get("ok") or not base_image(args.dir, f).exists()
        ]
        relayout = [
            f
            for f in wanted
            if f == "qcow2" and f in entries and qcow2_layout(entries[f], f) != args.qcow2_layout
        ]
        redo = [f for f in missing if f not in entries or args.retry_failed]
        redo += [f for f in relayout if f not in redo]
        if redo:
            prepare_images(args, redo, force=False)
    man = load_manifest(args.dir)
    ok = []
    for f in wanted:
        entry = man["formats"].get(f, {})
        if entry.get("ok"):
            ok.append(f)
            if not bench_image(args.dir, f).exists():
                copy_image(base_image(args.dir, f), bench_image(args.dir, f))
        else:
            log(f"{f}: skipped, image preparation failed: {entry.get('error', 'not prepared')}")
    return ok


# ---------------------------------------------------------------------------
# fio


class Periodic(threading.Thread):
    """Calls ``tick`` every ``interval`` seconds in a thread until ``stop``."""

    def __init__(self, interval: float) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self._stop_event = threading.Event()

    def tick(self) -> None:
        raise NotImplementedError

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.tick()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


class RssSampler(Periodic):
    """RSS of a fixed set of pids every `interval` seconds, in a thread."""

    def __init__(self, pids: Sequence[int], interval: float = 0.2) -> None:
        super().__init__(interval)
        self.pids = list(pids)
        self.samples: list[float] = []

    def tick(self) -> None:
        self.samples.append(rss_mib(self.pids))

    def finish(self) -> dict[str, float]:
        self.stop()
        if not self.samples:
            return {}
        steady = self.samples[len(self.samples) // 2 :]
        return {"rss_mib": statistics.median(steady), "rss_peak_mib": max(self.samples)}


def fio_argv(args: argparse.Namespace, wl: Workload, uri: str, size: int | None) -> list[str]:
    argv = [
        "fio",
        f"--name={wl.name}",
        "--ioengine=nbd",
        f"--uri={uri}",
        f"--rw={wl.rw}",
        f"--bs={wl.bs}",
        f"--iodepth={wl.iodepth}",
        "--time_based",
        f"--runtime={args.runtime}",
        f"--ramp_time={args.ramp}",
        "--norandommap",
        "--randrepeat=0",
        "--group_reporting",
        "--output-format=json",
    ]
    if wl.numjobs > 1:
        argv.append(f"--numjobs={wl.numjobs}")
        if not wl.rw.startswith("rand") and size:
            part = size // wl.numjobs
            argv += [f"--size={part}", f"--offset_increment={part}"]
    if args.pin_fio:
        argv = ["taskset", "-c", args.pin_fio, *argv]
    return argv


def parse_fio(outfile: Path, rc: int, err: str) -> Record:
    try:
        text = outfile.read_text()
        job = json.loads(text[text.index("{") :])["jobs"][0]
    except (OSError, ValueError, KeyError, IndexError):
        return {"error": f"fio rc={rc}: {err[-400:]}"}
    if job.get("error"):
        return {"error": f"fio job error {job['error']}: {err[-400:]}"}
    sec = job["write"] if job["write"]["io_bytes"] > job["read"]["io_bytes"] else job["read"]
    pct = sec.get("clat_ns", {}).get("percentile", {})
    numjobs = int(job.get("job options", {}).get("numjobs", 1))
    res: Record = {
        "mib_s": sec["bw_bytes"] / MIB,
        "iops": sec["iops"],
        "lat_mean_us": sec["lat_ns"]["mean"] / 1000,
        "clat_p50_us": pct.get("50.000000", 0) / 1000,
        "clat_p99_us": pct.get("99.000000", 0) / 1000,
        # with group_reporting fio reports the per-job average CPU: scale to the total
        "fio_cpu_pct": (job.get("usr_cpu", 0) + job.get("sys_cpu", 0)) * numjobs,
    }
    if rc != 0 and not res["iops"]:
        res["error"] = f"fio rc={rc}: {err[-400:]}"
    return res


def run_fio_argv(args: argparse.Namespace, argv: Sequence[str]) -> tuple[int, str, str]:
    """Run fio to its end or past its runtime plus a margin: (rc, stdout, stderr)."""
    try:
        p = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=args.runtime + args.ramp + 120,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return -1, "", "fio timed out"
    return p.returncode, p.stdout or "", (p.stderr or "").strip()


def run_fio(args: argparse.Namespace, wl: Workload, srv: Server, outfile: Path) -> Record:
    argv = [*fio_argv(args, wl, srv.uri(), srv.export_size), f"--output={outfile}"]
    res: Record = {"fio_cmd": shlex.join(argv)}
    t = time.monotonic()
    prewarm(srv.image)
    res["prewarm_s"] = time.monotonic() - t
    os.sync()
    assert srv.pid is not None
    res["rss_start_mib"] = rss_mib(srv.pids)
    sampler = RssSampler(srv.pids)
    cpu0 = tree_cpu_seconds(srv.pid)
    b0, t0 = sys_cpu()
    w0 = time.monotonic()
    sampler.start()
    rc, _, err = run_fio_argv(args, argv)
    wall = time.monotonic() - w0
    b1, t1 = sys_cpu()
    res["srv_cpu_pct"] = 100.0 * (tree_cpu_seconds(srv.pid) - cpu0) / wall
    res.update(sampler.finish())
    res["sys_busy_pct"] = 100.0 * (os.cpu_count() or 1) * (b1 - b0) / max(1, t1 - t0)
    res["wall_s"] = wall
    res.update(parse_fio(outfile, rc, err))
    if "fio_cpu_pct" in res:
        other = res["sys_busy_pct"] - res["srv_cpu_pct"] - res["fio_cpu_pct"]
        res["other_cpu_pct"] = max(0.0, other)
    return res


def select_workloads(spec: str | None, table: Sequence[Workload] = WORKLOADS) -> list[Workload]:
    """Comma list of names; a name that is not exact selects all names it prefixes."""
    if not spec:
        return list(table)
    names = {w.name for w in table}
    want = [s.strip() for s in spec.split(",") if s.strip()]
    out = [
        w
        for w in table
        if any(w.name == s or (s not in names and w.name.startswith(s)) for s in want)
    ]
    if not out:
        raise SystemExit(f"no workload matches {spec!r}; known: {sorted(names)}")
    return out


# ---------------------------------------------------------------------------
# benchmark units


def runs_format(spec: ServerSpec, fmt: str) -> bool:
    return spec.formats is None or fmt in spec.formats


def run_unit(
    args: argparse.Namespace, spec: ServerSpec, fmt: str, wl: Workload, rnd: int
) -> Record:
    """Start the server, run one workload, stop it; return the record."""
    base: Record = {
        "server": spec.name,
        "subject": spec.subject,
        "fmt": fmt,
        "workload": wl.name,
        "round": rnd,
        "numjobs": wl.numjobs,
        "iodepth": wl.iodepth,
        "bs": wl.bs,
    }
    image = bench_image(args.dir, fmt)
    if args.fresh == "always" or (args.fresh == "writes" and wl.writes):
        copy_image(base_image(args.dir, fmt), image)
    tag = f"{wl.name}-r{rnd}"
    srv = Server(spec, fmt, image, args, tag)
    base["server_cmd"] = srv.cmdline
    try:
        srv.start()
    except ServerError as e:
        srv.stop()
        log(f"{spec.name}/{fmt}/{wl.name} r{rnd}: START FAILED: {e}")
        return {**base, "error": f"server start failed: {e}"}
    try:
        out = args.dir / "logs" / f"fio-{spec.name}-{fmt}-{tag}.json"
        rec = {**base, **run_fio(args, wl, srv, out)}
        if not alive(srv.pid) and "error" not in rec:
            rec["error"] = "server died during the job: " + srv.log_tail()
        if srv.profile_path:
            rec["profile"] = str(srv.profile_path)
    finally:
        srv.stop()
    if "error" in rec:
        log(f"{spec.name}/{fmt}/{wl.name} r{rnd}: ERROR {rec['error']}")
    else:
        log(
            f"{spec.name}/{fmt}/{wl.name} r{rnd}: {rec['mib_s']:.1f} MiB/s "
            f"{rec['iops']:.0f} IOPS lat {rec['lat_mean_us']:.0f}us "
            f"CPU srv {rec['srv_cpu_pct']:.0f}% fio {rec['fio_cpu_pct']:.0f}% "
            f"other {rec.get('other_cpu_pct', 0):.0f}% RSS {rec.get('rss_mib', 0):.0f} MiB"
        )
    return rec


def chosen_servers(args: argparse.Namespace) -> list[ServerSpec]:
    specs = [parse_server(s) for s in (args.server or DEFAULT_SERVERS)]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise SystemExit(f"server labels must be unique: {names}")
    if args.subject:
        specs = [ServerSpec(s.name, s.cmd, s.formats, s.doc, s.name == args.subject) for s in specs]
    return specs


def cmd_compare(args: argparse.Namespace) -> int:
    specs = chosen_servers(args)
    formats = usable_formats(args)
    wls = select_workloads(args.workloads)
    records: list[Record] = []
    for rnd in range(1, args.rounds + 1):
        order = list(reversed(specs)) if args.order == "abba" and rnd % 2 == 0 else specs
        for fmt in formats:
            for wl in wls:
                records.extend(
                    run_unit(args, spec, fmt, wl, rnd) for spec in order if runs_format(spec, fmt)
                )
    result: dict[str, Any] = {
        "mode": "compare",
        "versions": versions(args),
        "args": argv_record(args),
    }
    result["records"] = records
    print_compare(records, formats, wls, args.baseline_format)
    write_json(args, result)
    return 0 if all("error" not in r for r in records) else 1


def cmd_memory(args: argparse.Namespace) -> int:
    specs = chosen_servers(args) if args.server else [PRESETS["nbdserve"]]
    formats = usable_formats(args)
    wls = select_workloads(args.workloads, memory_workloads(args.clients, args.iodepth))
    records: list[Record] = []
    for rnd in range(1, args.rounds + 1):
        for fmt in formats:
            for wl in wls:
                records.extend(
                    memory_unit(args, spec, fmt, wl, rnd)
                    for spec in specs
                    if runs_format(spec, fmt)
                )
    result: dict[str, Any] = {
        "mode": "memory",
        "versions": versions(args),
        "args": argv_record(args),
    }
    result["records"] = records
    print_memory(records)
    write_json(args, result)
    return 0 if all("error" not in r for r in records) else 1


def memory_unit(
    args: argparse.Namespace, spec: ServerSpec, fmt: str, wl: Workload, rnd: int
) -> Record:
    """run_unit, plus the RSS once the clients have gone (buffers given back?)."""
    image = bench_image(args.dir, fmt)
    if args.fresh == "always" or (args.fresh == "writes" and wl.writes):
        copy_image(base_image(args.dir, fmt), image)
    tag = f"mem-{wl.name}-r{rnd}"
    srv = Server(spec, fmt, image, args, tag)
    base: Record = {"server": spec.name, "fmt": fmt, "workload": wl.name, "round": rnd}
    base.update(numjobs=wl.numjobs, iodepth=wl.iodepth, bs=wl.bs, server_cmd=srv.cmdline)
    try:
        srv.start()
        time.sleep(0.5)
        base["rss_idle_mib"] = rss_mib(srv.pids)
        out = args.dir / "logs" / f"fio-{spec.name}-{fmt}-{tag}.json"
        rec = {**base, **run_fio(args, wl, srv, out)}
        time.sleep(args.settle)
        rec["rss_after_mib"] = rss_mib(srv.pids)
        if not alive(srv.pid) and "error" not in rec:
            rec["error"] = "server died during the job: " + srv.log_tail()
    except ServerError as e:
        rec = {**base, "error": f"server start failed: {e}"}
    finally:
        srv.stop()
    log(
        f"{spec.name}/{fmt}/{wl.name}: "
        + (
            rec.get("error")
            or f"RSS idle {rec['rss_idle_mib']:.0f} steady {rec.get('rss_mib', 0):.0f} "
            f"peak {rec.get('rss_peak_mib', 0):.0f} after {rec['rss_after_mib']:.0f} MiB, "
            f"{rec['iops']:.0f} IOPS"
        )
    )
    return rec


NEIGHBOUR_PHASES = ("hot", "cold", "both")


def evict(path: Path, offset: int, length: int) -> None:
    """Drop a clean range of a file from the page cache (the next read goes to the disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class Evictor(Periodic):
    """Keeps a range out of the page cache while a job reads it (every 50 ms)."""

    def __init__(self, path: Path, offset: int, length: int) -> None:
        super().__init__(0.05)
        self.path, self.offset, self.length = path, offset, length

    def tick(self) -> None:
        evict(self.path, self.offset, self.length)


def disk_read_bytes(pids: Iterable[int]) -> int:
    """Bytes the processes made the kernel fetch from storage (/proc/PID/io read_bytes)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/io") as f:
                for line in f:
                    if line.startswith("read_bytes:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def neighbour_argv(args: argparse.Namespace, uri: str, size: int, phase: str) -> list[str]:
    """One fio run: the hot job, the cold job or both (separate jobs, separate figures)."""
    half = size // 2
    argv = [
        "fio",
        "--ioengine=nbd",
        f"--uri={uri}",
        "--time_based",
        f"--runtime={args.runtime}",
        f"--ramp_time={args.ramp}",
        "--norandommap",
        "--randrepeat=0",
        "--output-format=json",
        "--rw=randread",
        "--bs=4k",
    ]
    if phase in ("hot", "both"):  # the first quarter, kept in the page cache
        argv += ["--name=hot", "--iodepth=1", "--offset=0", f"--size={size // 4}"]
    if phase in ("cold", "both"):  # the second half, kept out of it
        argv += ["--name=cold", f"--iodepth={args.cold_iodepth}", f"--offset={half}"]
        argv += [f"--size={size - half}"]
    if args.pin_fio:
        argv = ["taskset", "-c", args.pin_fio, *argv]
    return argv


def parse_neighbour_fio(text: str) -> dict[str, Record]:
    jobs = json.loads(text[text.index("{") :])["jobs"]
    out: dict[str, Record] = {}
    for job in jobs:
        read = job["read"]
        pct = read.get("clat_ns", {}).get("percentile", {})
        out[job["jobname"]] = {
            "iops": read["iops"],
            "lat_mean_us": read["lat_ns"]["mean"] / 1000,
            "clat_p99_us": pct.get("99.000000", 0) / 1000,
            "error": job.get("error", 0),
        }
    return out


def neighbour_unit(args: argparse.Namespace, spec: ServerSpec, rnd: int) -> Record:
    """One server: the three phases in one process, each from the same cache state."""
    image = bench_image(args.dir, "raw")
    size = image.stat().st_size
    half = size // 2
    cached = bool(args.cached)  # the cold client's half in the page cache too
    base: Record = {
        "server": spec.name,
        "fmt": "raw",
        "workload": "neighbour",
        "round": rnd,
        "cold_cached": cached,
    }
    srv = Server(spec, "raw", image, args, f"neighbour-r{rnd}")
    base["server_cmd"] = srv.cmdline
    try:
        srv.start()
    except ServerError as e:
        srv.stop()
        return {**base, "error": f"server start failed: {e}"}
    rec = dict(base)
    try:
        for phase in NEIGHBOUR_PHASES:
            os.sync()
            evict(image, 0, size)
            warm(image, 0, size if cached else size // 4)
            argv = neighbour_argv(args, srv.uri(), size, phase)
            evictor = None if cached else Evictor(image, half, size - half)
            if evictor is not None:
                evictor.start()
            disk0 = disk_read_bytes(srv.pids)
            try:
                rc, out, err = run_fio_argv(args, argv)
            finally:
                if evictor is not None:
                    evictor.stop()
            disk = disk_read_bytes(srv.pids) - disk0
            try:
                jobs = parse_neighbour_fio(out)
            except (ValueError, KeyError):
                rec["error"] = f"{phase}: fio rc={rc}: {err[-400:]}"
                break
            for job, figures in jobs.items():
                if figures.pop("error"):
                    rec["error"] = f"{phase}/{job}: fio job error: {err[-400:]}"
                rec.update({f"{phase}_{job}_{k}": v for k, v in figures.items()})
            rec[f"{phase}_disk_mib"] = disk / MIB
            rec[f"{phase}_fio_cmd"] = shlex.join(argv)
        if not alive(srv.pid) and "error" not in rec:
            rec["error"] = "server died during the job: " + srv.log_tail()
    finally:
        srv.stop()
    if "error" in rec:
        log(f"{spec.name}/neighbour r{rnd}: ERROR {rec['error']}")
    else:
        log(
            f"{spec.name}/neighbour r{rnd}: hot alone {rec['hot_hot_iops']:.0f} IOPS "
            f"p99 {rec['hot_hot_clat_p99_us']:.0f}us; cold alone {rec['cold_cold_iops']:.0f} "
            f"IOPS ({rec['cold_disk_mib']:.0f} MiB from disk); together hot "
            f"{rec['both_hot_iops']:.0f} IOPS p99 {rec['both_hot_clat_p99_us']:.0f}us, "
            f"cold {rec['both_cold_iops']:.0f} IOPS"
        )
    return rec


def cmd_neighbour(args: argparse.Namespace) -> int:
    specs = chosen_servers(args) if args.server else [PRESETS["nbdserve"], PRESETS["nbdkit-file"]]
    args.format = ["raw"]
    usable_formats(args)  # prepares the raw image on first use
    records: list[Record] = []
    for rnd in range(1, args.rounds + 1):
        records.extend(neighbour_unit(args, s, rnd) for s in specs if runs_format(s, "raw"))
    result: dict[str, Any] = {
        "mode": "neighbour",
        "versions": versions(args),
        "args": argv_record(args),
        "records": records,
    }
    print_neighbour(records)
    write_json(args, result)
    return 0 if all("error" not in r for r in records) else 1


def argv_record(args: argparse.Namespace) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}


def write_json(args: argparse.Namespace, result: dict[str, Any]) -> None:
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1))
        log(f"wrote {args.json_out}")


# ---------------------------------------------------------------------------
# reporting

FIELDS = (
    "mib_s",
    "iops",
    "lat_mean_us",
    "clat_p99_us",
    "srv_cpu_pct",
    "fio_cpu_pct",
    "other_cpu_pct",
    "rss_mib",
    "rss_peak_mib",
    "rss_idle_mib",
    "rss_after_mib",
)
Key = tuple[str, str, str]  # fmt, server, workload


def aggregate(records: Sequence[Record]) -> dict[Key, Record]:
    """Medians over rounds per (fmt, server, workload)."""
    groups: dict[Key, list[Record]] = {}
    for r in records:
        groups.setdefault((r["fmt"], r["server"], r["workload"]), []).append(r)
    agg: dict[Key, Record] = {}
    for k, rs in groups.items():
        ok = [r for r in rs if "error" not in r and r.get("iops")]
        if not ok:
            agg[k] = {"error": rs[0].get("error", "no result"), "n": 0}
            continue
        a: Record = {"n": len(ok), "errors": len(rs) - len(ok)}
        for f in FIELDS:
            vals = [r[f] for r in ok if r.get(f) is not None]
            if vals:
                a[f] = statistics.median(vals)
        iops = [r["iops"] for r in ok]
        a["spread_pct"] = (
            100.0 * (max(iops) - min(iops)) / statistics.mean(iops) if len(iops) > 1 else None
        )
        agg[k] = a
    return agg


def subject_name(records: Sequence[Record]) -> str | None:
    return next((r["server"] for r in records if r.get("subject")), None)


def peer_ratios(
    records: Sequence[Record], subject: str, baseline_format: str
) -> dict[tuple[str, str], tuple[list[float], str, str]]:
    """(fmt, workload) -> (per-round subject/best-peer IOPS ratios, best peer, peer fmt).

    The best peer of a workload is the peer with the highest median IOPS over the
    rounds; the ratio is taken in every round against that peer. A format without
    peers (fvd) is compared with the peers of `baseline_format` (the same data, raw).
    """
    agg = aggregate(records)
    by_round: dict[tuple[str, str, str], dict[Any, float]] = {}
    for r in records:
        if "error" not in r and r.get("iops"):
            key = (r["fmt"], r["server"], r["workload"])
            by_round.setdefault(key, {})[r["round"]] = r["iops"]
    out: dict[tuple[str, str], tuple[list[float], str, str]] = {}
    for fmt, wl in dict.fromkeys((f, w) for f, s, w in by_round if s == subject):
        for pfmt in (fmt, baseline_format):
            peers = {
                s: a["iops"]
                for (f, s, w), a in agg.items()
                if f == pfmt and w == wl and s != subject and a.get("iops")
            }
            if peers:
                break
        else:
            continue
        best = max(peers, key=lambda s: peers[s])
        mine, theirs = by_round[(fmt, subject, wl)], by_round[(pfmt, best, wl)]
        ratios = [mine[rnd] / theirs[rnd] for rnd in mine if rnd in theirs]
        if ratios:
            out[(fmt, wl)] = (ratios, best, pfmt)
    return out


def pct(a: Record, f: str) -> str:
    return f"{a[f]:.0f}" if a.get(f) is not None else "-"


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def print_compare(
    records: Sequence[Record],
    formats: Sequence[str],
    wls: Sequence[Workload],
    baseline_format: str = "raw",
) -> None:
    agg = aggregate(records)
    subject = subject_name(records)
    servers = list(dict.fromkeys(r["server"] for r in records))
    rounds = len({r["round"] for r in records})
    if subject:
        rt = peer_ratios(records, subject, baseline_format)
        print(
            f"\n### {subject} vs the best peer per workload (medians of {rounds} round(s); "
            "ratio = median (range) of per-round IOPS ratios; CPU 100 = one core)\n"
        )
        rows = []
        for fmt in formats:
            for wl in wls:
                a = agg.get((fmt, subject, wl.name))
                if a is None:
                    continue
                ratios, peer, pfmt = rt.get((fmt, wl.name), ([], None, fmt))
                p = agg.get((pfmt, peer, wl.name), {}) if peer else {}
                label = "-" if peer is None else (peer if pfmt == fmt else f"{peer} ({pfmt})")
                ratio_cell = ratio_text(ratios)
                peer_cells = summary_cells(p, rss=False)
                rows.append([fmt, wl.name, *summary_cells(a), label, *peer_cells, ratio_cell])
        table(
            [
                "format",
                "workload",
                f"{subject} IOPS",
                "MiB/s",
                "lat µs",
                "CPU %",
                "RSS MiB",
                "best peer",
                "peer IOPS",
                "MiB/s",
                "lat µs",
                "CPU %",
                "ratio",
            ],
            rows,
        )
    print(
        "\n### all servers (medians; ±spread = (max-min)/mean of IOPS over rounds; "
        "CPU: server / fio / other, 100 = one core)\n"
    )
    rows = []
    for fmt in formats:
        for wl in wls:
            for s in servers:
                a = agg.get((fmt, s, wl.name))
                if a is None:
                    continue
                if "error" in a:
                    rows.append([fmt, wl.name, s, "FAIL", "", "", "", "", "", ""])
                    continue
                sp = f"±{a['spread_pct']:.0f}%" if a.get("spread_pct") is not None else "-"
                cpu = f"{pct(a, 'srv_cpu_pct')} / {pct(a, 'fio_cpu_pct')} / "
                cpu += pct(a, "other_cpu_pct")
                rows.append(
                    [
                        fmt,
                        wl.name,
                        s,
                        fmt_k(a["iops"]),
                        fmt_num(a["mib_s"]),
                        fmt_num(a["lat_mean_us"]),
                        fmt_num(a.get("clat_p99_us")),
                        cpu,
                        fmt_num(a.get("rss_mib")),
                        f"{sp} n={a['n']}",
                    ]
                )
    header = ["format", "workload", "server", "IOPS", "MiB/s", "lat µs", "p99 µs", "CPU %"]
    table([*header, "RSS MiB", "spread"], rows)
    print_errors_and_commands(records)


def ratio_text(ratios: Sequence[float]) -> str:
    """Median in bold, then the range over the rounds."""
    if not ratios:
        return "-"
    text = f"**{statistics.median(ratios):.2f}**"
    if len(ratios) > 1:
        text += f" ({min(ratios):.2f}-{max(ratios):.2f})"
    return text


def summary_cells(a: Record, rss: bool = True) -> list[str]:
    if not a:
        cells = ["-"] * 4
    elif "error" in a:
        cells = ["FAIL", "-", "-", "-"]
    else:
        cells = [fmt_k(a["iops"]), fmt_num(a["mib_s"]), fmt_num(a["lat_mean_us"])]
        cells.append(pct(a, "srv_cpu_pct"))
    if rss:
        cells.append(fmt_num(a.get("rss_mib")) if a else "-")
    return cells


def print_memory(records: Sequence[Record]) -> None:
    agg = aggregate(records)
    print("\n### server RSS under many clients (MiB; medians over rounds)\n")
    rows = []
    for (fmt, s, wl), a in agg.items():
        if "error" in a:
            rows.append([fmt, wl, s, "FAIL", "", "", "", "", "", ""])
            continue
        rss = [fmt_num(a.get(f)) for f in ("rss_idle_mib", "rss_mib", "rss_peak_mib")]
        after = fmt_num(a.get("rss_after_mib"))
        perf = [fmt_k(a["iops"]), fmt_num(a["mib_s"]), pct(a, "srv_cpu_pct")]
        rows.append([fmt, wl, s, *rss, after, *perf])
    header = ["format", "workload", "server", "idle", "steady", "peak", "after", "IOPS"]
    table([*header, "MiB/s", "CPU %"], rows)
    print_errors_and_commands(records)


def print_neighbour(records: Sequence[Record]) -> None:
    """Medians over rounds per server: the hot client alone and beside the cold one."""
    if records and all(r.get("cold_cached") for r in records):
        title = "a cached QD1 client beside a QD16 client whose reads hit the page cache too"
    else:
        title = "a cached QD1 client beside a QD16 client whose reads miss the page cache"
    print(f"\n### {title} (raw; medians over rounds)\n")
    by_server: dict[str, list[Record]] = {}
    for r in records:
        if "error" not in r:
            by_server.setdefault(r["server"], []).append(r)

    def med(rs: list[Record], field: str) -> float:
        return float(statistics.median(r[field] for r in rs))

    rows = []
    for server, rs in by_server.items():
        alone, beside = med(rs, "hot_hot_iops"), med(rs, "both_hot_iops")
        rows.append(
            [
                server,
                fmt_k(alone),
                fmt_num(med(rs, "hot_hot_clat_p99_us")),
                fmt_k(med(rs, "cold_cold_iops")),
                fmt_num(med(rs, "cold_disk_mib")),
                fmt_k(beside),
                fmt_num(med(rs, "both_hot_clat_p99_us")),
                fmt_k(med(rs, "both_cold_iops")),
                f"{beside / alone:.2f}" if alone else "-",
            ]
        )
    table(
        [
            "server",
            "hot alone IOPS",
            "p99 µs",
            "cold alone IOPS",
            "MiB from disk",
            "hot beside cold IOPS",
            "p99 µs",
            "cold IOPS",
            "hot kept",
        ],
        rows,
    )
    print_errors_and_commands(records)


def print_errors_and_commands(records: Sequence[Record]) -> None:
    errors = {(r["server"], r["fmt"], r["error"][:200]): r for r in records if "error" in r}
    if errors:
        print("\n### errors\n")
        for (server, fmt, _), r in errors.items():
            print(f"- {server} / {fmt} / {r['workload']}: {r['error'][:300]}")
    print("\n### server commands\n")
    seen: set[tuple[str, str]] = set()
    for r in records:
        if (r["server"], r["fmt"]) not in seen and r.get("server_cmd"):
            seen.add((r["server"], r["fmt"]))
            print(f"- {r['server']} ({r['fmt']}): `{r['server_cmd']}`")


def cmd_report(args: argparse.Namespace) -> int:
    by_mode: dict[str, list[Record]] = {}
    for i, path in enumerate(args.files, 1):
        data = json.loads(Path(path).read_text())
        records = data["records"]
        if len(args.files) > 1:  # round 1 of file 1 and of file 2 are different rounds
            records = [{**r, "round": f"{i}.{r['round']}"} for r in records]
        by_mode.setdefault(data["mode"], []).extend(records)
        print(f"<!-- {path}: {json.dumps(data.get('versions', {}))} -->")
    if "compare" in by_mode:
        recs = by_mode["compare"]
        formats = list(dict.fromkeys(r["fmt"] for r in recs))
        present = {r["workload"] for r in recs}
        print_compare(recs, formats, [w for w in WORKLOADS if w.name in present], args.baseline)
    if "memory" in by_mode:
        print_memory(by_mode["memory"])
    if "neighbour" in by_mode:
        print_neighbour(by_mode["neighbour"])
    return 0


# py-spy counts a trio worker thread waiting for its next job (a lock acquire with
# a timeout) as active: samples whose innermost frame is that wait are idle time.
IDLE_LEAF = re.compile(r"^WorkerThread\._work \(.*_thread_cache\.py(:\d+)?\)$")


def cmd_profile_summary(args: argparse.Namespace) -> int:
    """Self and inclusive sample shares per function of py-spy raw (collapsed) output."""
    for path in args.files:
        self_counts: Counter[str] = Counter()
        incl_counts: Counter[str] = Counter()
        total = idle = 0
        for line in Path(path).read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            frames = stack.split(";")
            if IDLE_LEAF.match(frames[-1]):
                idle += n
                continue
            total += n
            frames = [strip_line(f) for f in frames]
            self_counts[frames[-1]] += n
            for f in set(frames):
                incl_counts[f] += n
        total = max(total, 1)
        print(f"\n### {path}: {total} busy samples ({idle} idle worker-thread samples left out)\n")
        rows = [[f"{100 * n / total:.1f}", f] for f, n in self_counts.most_common(args.top)]
        table(["self %", "function"], rows)
        print()
        rows = [[f"{100 * n / total:.1f}", f] for f, n in incl_counts.most_common(args.top)]
        table(["incl %", "function"], rows)
    return 0


def strip_line(frame: str) -> str:
    """'name (path/file.py:123)' -> 'name (path/file.py)': merge lines of one function."""
    return re.sub(r":\d+\)$", ")", frame)


def cmd_prepare(args: argparse.Namespace) -> int:
    args.size = args.size or GIB
    prepare_images(args, args.format or list(FORMATS), force=args.force)
    man = load_manifest(args.dir)
    print(json.dumps(man, indent=1))
    return 0 if all(e.get("ok") for e in man["formats"].values()) else 1


def cmd_presets(args: argparse.Namespace) -> int:
    for name, p in PRESETS.items():
        fmts = ",".join(p.formats or ("any",))
        print(f"{name:16s} formats={fmts}{' (subject)' if p.subject else ''}\n    {p.cmd}")
        print(f"    # {p.doc}")
    return 0


# ---------------------------------------------------------------------------
# command line


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="scratch dir (%(default)s)")
    p.add_argument(
        "--size",
        type=parse_size,
        help="image size (default: 1G, or the size of the images already in --dir)",
    )
    p.add_argument(
        "--format",
        action="append",
        choices=FORMATS,
        help="image format (repeatable; default: all)",
    )
    p.add_argument(
        "--nbdserve-src",
        type=Path,
        default=REPO_ROOT,
        help="directory holding the nbdserve package to run (default: this checkout)",
    )
    p.add_argument("--port", type=int, default=0, help="TCP port (default: a free one)")
    p.add_argument("--export", default=DEFAULT_EXPORT)
    p.add_argument("--start-timeout", type=float, default=30.0)
    p.add_argument("--stop-timeout", type=float, default=60.0)
    p.add_argument("--pin-server", help="taskset CPU list for the servers")
    p.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="prepare: skip qemu-img compare of each image through nbdserve",
    )
    p.add_argument(
        "--retry-failed", action="store_true", help="re-prepare formats that failed before"
    )
    p.add_argument(
        "--qcow2-layout",
        choices=["sequential", "scattered"],
        default="sequential",
        help="qcow2 clusters in guest order (converted) or scattered over the file, as "
        "random guest writes leave them (written in shuffled order); the image is "
        "remade when the layout changes",
    )


def add_run(p: argparse.ArgumentParser, runtime: int) -> None:
    p.add_argument(
        "--server",
        action="append",
        help="PRESET | NAME=PRESET | NAME='TEMPLATE' (repeatable; see `presets`)",
    )
    p.add_argument("--subject", help="label of the server compared with the others")
    p.add_argument("--workloads", help="comma list of workload names or prefixes")
    p.add_argument("--runtime", type=int, default=runtime, help="seconds per fio job")
    p.add_argument("--ramp", type=int, default=1, help="fio ramp_time seconds (default 1)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument(
        "--fresh",
        choices=["never", "writes", "always"],
        default="never",
        help="copy base.FMT over bench.FMT before write workloads / every job",
    )
    p.add_argument("--pin-fio", help="taskset CPU list for fio")
    p.add_argument("--json-out", help="write all records to this JSON file")


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__ or ""
    ap = argparse.ArgumentParser(
        prog="nbdbench",
        description=doc.split("\n", 1)[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=doc[doc.index("Commands") : doc.index("Design notes")],
    )
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("prepare", help="make the scratch images")
    add_common(p)
    p.add_argument("--force", action="store_true", help="remake every image")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("compare", help="interleaved benchmark of several servers")
    add_common(p)
    add_run(p, runtime=5)
    p.add_argument("--order", choices=["abab", "abba"], default="abab")
    p.add_argument(
        "--baseline-format",
        default="raw",
        help="format whose peers a format without peers (fvd) is compared with",
    )
    p.add_argument("--profile", help="wrap the subject in `py-spy record -f raw` into DIR")
    p.add_argument("--profile-rate", type=int, default=200, help="py-spy samples per second")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("memory", help="server RSS with many clients")
    add_common(p)
    add_run(p, runtime=10)
    p.add_argument("--clients", type=int, default=16, help="fio jobs = connections (16)")
    p.add_argument("--iodepth", type=int, default=16, help="queue depth per client (16)")
    p.add_argument("--settle", type=float, default=2.0, help="seconds before the 'after' RSS")
    p.set_defaults(func=cmd_memory, profile=None)

    p = sub.add_parser("neighbour", help="cache misses of one client beside a cached one")
    add_common(p)
    add_run(p, runtime=5)
    p.add_argument("--cold-iodepth", type=int, default=16, help="queue depth of the cold client")
    p.add_argument(
        "--cached",
        action="store_true",
        help="keep the cold client's half in the page cache too: a deep client beside a "
        "shallow one, both served from memory",
    )
    p.set_defaults(func=cmd_neighbour, profile=None)

    p = sub.add_parser("report", help="re-print tables from --json-out files")
    p.add_argument("files", nargs="+")
    p.add_argument("--baseline", default="raw")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("profile-summary", help="top functions of py-spy raw profiles")
    p.add_argument("files", nargs="+")
    p.add_argument("--top", type=int, default=25)
    p.set_defaults(func=cmd_profile_summary)

    p = sub.add_parser("presets", help="list the built-in servers")
    p.set_defaults(func=cmd_presets)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "dir"):
        args.dir = args.dir.resolve()
        args.nbdserve_src = args.nbdserve_src.resolve()
        if args.port == 0:
            args.port = free_port()
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
