"""The benchmark harness runs end to end: prepare, one 1-second job, figures, JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_tools

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def nbdbench(*argv: str) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(
        [sys.executable, "-m", "tests.bench.nbdbench", *argv],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert p.returncode == 0, f"nbdbench {argv[0]} exited {p.returncode}:\n{p.stdout}\n{p.stderr}"
    return p


def one_second_run(
    command: str, scratch: Path, out: Path, *argv: str
) -> subprocess.CompletedProcess[str]:
    """``nbdbench COMMAND`` on a 32 MiB image, 1 s jobs without ramp, records to ``out``."""
    return nbdbench(
        command,
        *("--dir", str(scratch), "--size", "32M", "--runtime", "1", "--ramp", "0"),
        *("--json-out", str(out), *argv),
    )


def test_compare_one_workload_one_second(tmp_path: Path) -> None:
    require_tools("fio", "qemu-img", "nbdinfo", "nbdkit")
    out = tmp_path / "out.json"
    p = one_second_run(
        "compare",
        tmp_path / "scratch",
        out,
        *("--format", "raw", "--server", "nbdserve", "--server", "nbdkit-file"),
        *("--workloads", "randread-4k-qd16"),
    )
    result: dict[str, Any] = json.loads(out.read_text())
    by_server = {r["server"]: r for r in result["records"]}
    assert set(by_server) == {"nbdserve", "nbdkit-file"}
    for r in by_server.values():
        assert "error" not in r, r["error"]
        assert r["workload"] == "randread-4k-qd16"
        assert r["iops"] > 100
        assert r["mib_s"] == pytest.approx(r["iops"] * 4096 / (1 << 20), rel=0.01)
        assert r["rss_mib"] > 1
    # the subject's own process did the work: it was measured, not fio or the machine
    assert by_server["nbdserve"]["srv_cpu_pct"] > 1
    assert "| raw | randread-4k-qd16 | " in p.stdout
    assert "nbdkit-file" in p.stdout.split("### all servers")[0]  # the ratio's peer


def test_memory_mode_reports_rss(tmp_path: Path) -> None:
    require_tools("fio", "qemu-img", "nbdinfo")
    out = tmp_path / "mem.json"
    one_second_run(
        "memory",
        tmp_path / "scratch",
        out,
        *("--format", "raw", "--clients", "2", "--iodepth", "4"),
        *("--workloads", "randread-4k", "--settle", "0"),
    )
    (r,) = json.loads(out.read_text())["records"]
    assert "error" not in r, r["error"]
    assert r["workload"] == "randread-4k-qd4-2conn"
    assert r["numjobs"] == 2
    assert 1 < r["rss_idle_mib"] <= r["rss_peak_mib"]


def _filesystem_type(path: Path) -> str:
    """The type of the mount that holds ``path`` (longest mount point that prefixes it)."""
    best, kind = "", ""
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        mount = fields[1]
        inside = str(path).startswith(mount.rstrip("/") + "/") or str(path) == mount
        if inside and len(mount) > len(best):
            best, kind = mount, fields[2]
    return kind


def test_neighbour_mode_reads_the_cold_region_from_disk(tmp_path: Path) -> None:
    require_tools("fio", "qemu-img", "nbdinfo")
    out = tmp_path / "neighbour.json"
    scratch = tmp_path / "scratch"
    p = one_second_run("neighbour", scratch, out, "--server", "nbdserve")
    (r,) = json.loads(out.read_text())["records"]
    assert "error" not in r, r["error"]
    for phase, job in [("hot", "hot"), ("cold", "cold"), ("both", "hot"), ("both", "cold")]:
        assert r[f"{phase}_{job}_iops"] > 100, (phase, job)
    assert "hot_cold_iops" not in r  # each phase ran its own jobs
    if _filesystem_type(scratch) not in ("tmpfs", "ramfs", "overlay"):
        # the cold client's reads really missed the page cache
        assert r["cold_disk_mib"] > 0
    assert "| nbdserve |" in p.stdout
    assert "hot kept" in p.stdout


def test_scattered_qcow2_layout_scatters_the_clusters(tmp_path: Path) -> None:
    """`--qcow2-layout scattered` prepares a qcow2 holding the raw image's bytes with
    its clusters out of guest order, records the layout, and remakes the image when
    the layout asked for changes."""
    require_tools("qemu-img", "nbdinfo", "nbdsh")
    scratch = tmp_path / "scratch"
    common = ("--dir", str(scratch), "--size", "8M", "--format", "qcow2")
    nbdbench("prepare", *common, "--qcow2-layout", "scattered")
    manifest = json.loads((scratch / "images.json").read_text())
    assert manifest["formats"]["qcow2"] == {"ok": True, "layout": "scattered"}
    extents = json.loads(
        subprocess.run(
            ["qemu-img", "map", "--output=json", str(scratch / "base.qcow2")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    hosts = [e["offset"] for e in extents if e.get("data")]
    assert len(hosts) > 1
    assert hosts != sorted(hosts), "clusters are in guest order"
    images = (str(scratch / "base.raw"), str(scratch / "base.qcow2"))
    compare = ["qemu-img", "compare", "-f", "raw", "-F", "qcow2", *images]
    subprocess.run(compare, check=True, capture_output=True)
    nbdbench("prepare", *common)  # back to the default layout: remade
    manifest = json.loads((scratch / "images.json").read_text())
    assert manifest["formats"]["qcow2"] == {"ok": True, "layout": "sequential"}
