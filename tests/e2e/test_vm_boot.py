"""A real guest on an nbdserve export: a Debian kernel boots under QEMU, its /init mounts the
ext4 disk behind ``-drive file=nbd://...,if=virtio``, checks known files, writes new ones and
powers off; the test then reads the overlay back through nbdserve and checks the base is
untouched.  The qcow2 overlay is served over TCP, the FVD one (prefetch running while the
guest works) over a Unix socket.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbdserve.block import formats
from nbdserve.errors import UnknownFormatError
from tests.conftest import require_tools
from tests.e2e.guest import (
    Guest,
    ModuleTree,
    boot,
    build_initramfs,
    cached_kernel_debs,
    console_tail,
    extract_kernel_deb,
    find_busybox_static,
    make_ext4,
    module_name,
    sha256_digests,
)
from tests.helpers.server import free_port, server_process

pytestmark = pytest.mark.e2e

BOOT_TIMEOUT = 240.0  # seconds; TCG boots this guest in ~4 s here
COPY_SOURCE = "data/random.bin"  # the guest copies it to /copy.bin (allocating writes)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def nbdserve(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nbdserve", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def checked(*argv: str | Path) -> str:
    result = subprocess.run(list(map(str, argv)), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{argv} exited {result.returncode}:\n{result}"
    return result.stdout


def make_base(tmp_path: Path, files: dict[str, bytes]) -> Path:
    """base.qcow2 (written by qemu-img, the reference) holding an ext4 with the known files."""
    require_tools("mkfs.ext4", "debugfs", "e2fsck", "qemu-img")
    raw = tmp_path / "base.raw"
    make_ext4(files, tmp_path / "staging", raw)
    base = tmp_path / "base.qcow2"
    checked("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, base)
    raw.unlink()
    return base


@contextlib.contextmanager
def serving(image: Path, fmt: str, *, unix: bool) -> Iterator[str]:
    """``nbdserve serve`` as a child process; yields the drive URI; it must exit 0 on SIGTERM."""
    sock = image.parent / "nbd.sock"
    port = None if unix else free_port()
    if port is None:
        listen, drive = ["-k", str(sock)], f"nbd+unix:///vm?socket={sock}"
    else:
        listen, drive = ["-p", str(port)], f"nbd://127.0.0.1:{port}/vm"
    argv = ["serve", "-f", fmt, "-x", "vm", *listen, str(image)]
    with server_process(argv, port=port, socket_path=None if port else str(sock)) as proc:
        yield drive
    assert proc.returncode == 0, f"nbdserve exited {proc.returncode} at shutdown"


def debugfs(image: Path, request: str) -> bytes:
    result = subprocess.run(
        ["debugfs", "-R", request, str(image)], capture_output=True, timeout=60, check=True
    )
    return result.stdout


def check_exported_filesystem(
    export: Path, files: dict[str, bytes], token: str, tmp_path: Path
) -> None:
    """What the guest wrote is on the disk read back through nbdserve, and the fs is clean."""
    fsck = subprocess.run(["e2fsck", "-fn", str(export)], capture_output=True, text=True)
    assert fsck.returncode == 0, f"e2fsck found problems:\n{fsck.stdout}{fsck.stderr}"
    assert debugfs(export, "cat /newfile.txt") == f"{token}\n".encode()
    dumped = tmp_path / "dumped"
    for name, data in {**files, "copy.bin": files[COPY_SOURCE]}.items():
        debugfs(export, f"dump /{name} {dumped}")
        assert dumped.read_bytes() == data, f"/{name} differs on the exported disk"


def run_guest(
    guest: Guest,
    files: dict[str, bytes],
    overlay: Path,
    fmt: str,
    *,
    unix: bool,
    base: Path | None,
) -> float:
    """Boot the guest on overlay (served by nbdserve) and verify what it wrote; the base
    (when there is one) must not change.  Returns the seconds from QEMU's start to its exit."""
    tmp_path = overlay.parent
    base_digest = sha256_file(base) if base else None
    token = secrets.token_hex(8)
    export = tmp_path / "export.raw"
    with serving(overlay, fmt, unix=unix) as drive:
        result = boot(
            guest,
            drive,
            {"e2e_token": token, "e2e_copy": COPY_SOURCE},
            tmp_path / "console.log",
            BOOT_TIMEOUT,
        )
        tail = "\n".join(console_tail(result.console))
        assert result.returncode is not None, f"guest still running after {BOOT_TIMEOUT} s:\n{tail}"
        assert result.failure() is None, f"{result.failure()}\n{tail}"
        assert result.passed, f"no PASS marker (qemu exited {result.returncode}):\n{tail}"
        assert result.returncode == 0, f"qemu exited {result.returncode}:\n{tail}"
        checked("qemu-img", "convert", "-f", "raw", "-O", "raw", drive, export)
    check_exported_filesystem(export, files, token, tmp_path)
    if base is not None:
        assert sha256_file(base) == base_digest, "the base image changed"
    if hasattr(formats.load(fmt), "check_image"):
        check = nbdserve("img", "check", overlay)
        assert check.returncode == 0, f"nbdserve img check: {check.stdout}{check.stderr}"
    return result.seconds


def test_guest_boots_from_qcow2_overlay_over_tcp(
    guest: Guest, files: dict[str, bytes], tmp_path: Path
) -> None:
    make_base(tmp_path, files)
    overlay = tmp_path / "overlay.qcow2"
    created = nbdserve("img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", overlay)
    assert created.returncode == 0, created.stderr
    seconds = run_guest(guest, files, overlay, "qcow2", unix=False, base=tmp_path / "base.qcow2")
    checked("qemu-img", "check", overlay)  # the reference checker agrees the overlay is clean
    # the guest's writes landed in the overlay: it now maps data of its own
    mapped = json.loads(checked("qemu-img", "map", "--output", "json", overlay))
    assert any(e["data"] and e["depth"] == 0 for e in mapped)
    print(f"qcow2 overlay: boot to PASS marker {seconds:.1f} s")


def fvd_available() -> bool:
    try:
        return hasattr(formats.load("fvd"), "create_image")
    except UnknownFormatError:
        return False


def test_guest_boots_from_fvd_overlay_with_prefetch_over_unix(
    guest: Guest, files: dict[str, bytes], tmp_path: Path
) -> None:
    if not fvd_available():
        pytest.skip("the FVD driver (nbdserve.block.fvd with create_image) is not available")
    make_base(tmp_path, files)
    overlay = tmp_path / "overlay.fvd"
    created = nbdserve(
        "img", "create", "-f", "fvd", "-b", "base.qcow2", "-F", "qcow2",
        "-o", "prefetch_start_delay=0", overlay,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    seconds = run_guest(guest, files, overlay, "fvd", unix=True, base=tmp_path / "base.qcow2")
    info = json.loads(nbdserve("img", "info", "--output", "json", overlay).stdout)
    data = info["format-specific"]["data"]
    # prefetch ran alongside the guest (it starts at once and yields to guest requests)
    assert data["prefetch-bytes-copied"] > 0, data
    if data["base-img-fully-prefetched"]:
        # the overlay no longer needs its base: without it, it still shows the guest's disk
        (tmp_path / "base.qcow2").rename(tmp_path / "base.moved")
        with serving(overlay, "fvd", unix=True) as drive:
            checked("qemu-img", "convert", "-f", "raw", "-O", "raw", drive, tmp_path / "alone.raw")
        assert sha256_file(tmp_path / "alone.raw") == sha256_file(tmp_path / "export.raw")
    print(f"fvd overlay: boot to PASS marker {seconds:.1f} s, prefetch {data['prefetch-progress']}")


def test_module_load_order_agrees_with_modules_dep(guest: Guest) -> None:
    """The initramfs's load order comes from .modinfo (a .deb has no modules.dep); where the
    kernel is installed, every module's dependencies in depmod's modules.dep load before it."""
    modules_dep = guest.kernel.modules_dir / "modules.dep"
    if not modules_dep.exists():
        pytest.skip("the kernel was extracted from a .deb: there is no modules.dep to compare")
    depmod = {
        module_name(Path(target)): {module_name(Path(d)) for d in deps.split()}
        for target, _, deps in (
            line.partition(":") for line in modules_dep.read_text().splitlines()
        )
    }
    assert (
        "virtio_blk" in guest.modules
        or "virtio_blk" in ModuleTree.scan(guest.kernel.modules_dir).builtin
    )
    for i, name in enumerate(guest.modules):
        missing = depmod[name] - set(guest.modules[:i])
        assert not missing, f"{name} is loaded before its dependencies {missing}"


def test_guest_from_cached_kernel_deb_on_raw_export(
    guest: Guest, files: dict[str, bytes], tmp_path: Path
) -> None:
    """The other way to a kernel: a linux-image .deb from apt's cache, unpacked without root
    (what a developer who did not install a kernel gets); served as a plain raw image."""
    if guest.kernel.source.startswith("extracted"):
        pytest.skip("the session guest already uses a kernel extracted from a .deb")
    debs = cached_kernel_debs()
    if not debs:
        pytest.skip("no linux-image-*.deb in apt's cache")
    release, deb = debs[0]
    kernel = extract_kernel_deb(release, deb, tmp_path / "kernel")
    deb_guest = Guest(
        kernel,
        tmp_path / "initrd.cpio",
        build_initramfs(
            kernel, find_busybox_static(), sha256_digests(files), tmp_path / "initrd.cpio"
        ),
    )
    base = make_base(tmp_path, files)
    disk = tmp_path / "disk.raw"
    checked("qemu-img", "convert", "-f", "qcow2", "-O", "raw", base, disk)
    seconds = run_guest(deb_guest, files, disk, "raw", unix=False, base=None)
    print(f"raw export, kernel {release} from {deb.name}: boot to PASS marker {seconds:.1f} s")
