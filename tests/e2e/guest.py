"""Build and boot a tiny Linux guest for the end-to-end VM test, offline, from Debian packages.

Design notes:

* Kernel: a Debian kernel, found installed (``/boot/vmlinuz-R`` with ``/lib/modules/R``) or as
  a ``linux-image-R`` .deb left in apt's cache (extracted with ``dpkg-deb -x``, no root).
  The cloud flavour is preferred: it is a third of the size and boots faster under TCG.
* Modules: Debian builds virtio_blk (and, outside the cloud flavour, ext4) as modules.  The
  initramfs carries the ones the guest needs plus their dependencies, in load order.  A .deb
  has no modules.dep (depmod runs at install time), so dependencies come from each module's
  own ``.modinfo`` ELF section (``depends=``, ``softdep=pre:``), which works for both sources.
  Compressed modules (.ko.xz/.ko.zst, as in newer Debian kernels) are decompressed on the host:
  busybox's insmod takes plain ELF.
* Initramfs: an uncompressed cpio "newc" archive written here (no cpio tool, no root: device
  nodes are just header fields the kernel creates while unpacking).  It holds busybox-static,
  the modules, ``/dev/console`` (the kernel opens it for /init's stdio before devtmpfs is
  mounted) and ``/init``: a shell script that mounts the virtio disk, checks the known files,
  writes new ones, re-reads them after dropping the page cache, unmounts and prints a marker.
* Parameters reach /init on the kernel command line: ``name=value`` words the kernel does not
  know become /init's environment.  The markers never appear on the command line (the kernel
  echoes it on the console).
"""

from __future__ import annotations

import hashlib
import lzma
import os
import random
import re
import shutil
import struct
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

PASS_MARKER = "E2E-RESULT: PASS"
FAIL_MARKER = "E2E-RESULT: FAIL"

APT_ARCHIVES = Path("/var/cache/apt/archives")
BUSYBOX_STATIC_CANDIDATES = (Path("/bin/busybox"), Path("/usr/bin/busybox"))

# what /init must be able to load: the PCI transport, the block driver, the filesystem
WANTED_MODULES = ("virtio_pci", "virtio_blk", "ext4")

# a versioned kernel package (not the linux-image-amd64 meta package, not -dbg)
_KERNEL_DEB_RE = re.compile(r"^linux-image-(\d+\.\d+\.\d+-\d+-(?:[a-z]+-)?amd64)(?:-unsigned)?_")
_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst")


class GuestUnavailable(Exception):
    """A piece needed to build the guest is missing here (the test skips with this reason)."""


@dataclass(frozen=True)
class Kernel:
    release: str  # e.g. 6.1.0-56-cloud-amd64
    vmlinuz: Path
    modules_dir: Path  # the /lib/modules/RELEASE tree
    source: str  # where it came from, for the report


@dataclass(frozen=True)
class Guest:
    kernel: Kernel
    initrd: Path
    modules: tuple[str, ...]  # loaded by /init, in this order


# ---- finding a kernel ---------------------------------------------------------------------


def _release_key(release: str) -> tuple[int, ...]:
    """Order releases numerically (6.1.0-56 after 6.1.0-9); cloud first among equals."""
    numbers = tuple(int(n) for n in re.findall(r"\d+", release))
    return (*numbers, int("cloud" in release))


def installed_kernels(
    boot: Path = Path("/boot"), modules_root: Path = Path("/lib/modules")
) -> list[Kernel]:
    found = []
    for vmlinuz in boot.glob("vmlinuz-*"):
        release = vmlinuz.name.removeprefix("vmlinuz-")
        mods = modules_root / release
        if (
            release.endswith("-amd64")
            and (mods / "kernel").is_dir()
            and os.access(vmlinuz, os.R_OK)
        ):
            found.append(Kernel(release, vmlinuz, mods, f"installed {vmlinuz}"))
    return sorted(found, key=lambda k: _release_key(k.release), reverse=True)


def cached_kernel_debs(archives: Path = APT_ARCHIVES) -> list[tuple[str, Path]]:
    found = []
    for deb in archives.glob("linux-image-*.deb"):
        m = _KERNEL_DEB_RE.match(deb.name)
        if m and "-dbg" not in deb.name:
            found.append((m.group(1), deb))
    return sorted(found, key=lambda rd: _release_key(rd[0]), reverse=True)


def extract_kernel_deb(release: str, deb: Path, dest: Path) -> Kernel:
    """``dpkg-deb -x`` the package into dest (no root needed) and point into it."""
    if shutil.which("dpkg-deb") is None:
        raise GuestUnavailable("dpkg-deb is missing (needed to unpack the kernel package)")
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True, capture_output=True)
    vmlinuz = dest / "boot" / f"vmlinuz-{release}"
    mods = dest / "lib" / "modules" / release
    if not vmlinuz.is_file() or not mods.is_dir():
        raise GuestUnavailable(f"{deb.name} holds no vmlinuz-{release} and modules")
    return Kernel(release, vmlinuz, mods, f"extracted from {deb}")


def find_kernel(workdir: Path) -> Kernel:
    """An installed Debian kernel, else the newest kernel .deb in apt's cache."""
    installed = installed_kernels()
    if installed:
        return installed[0]
    debs = cached_kernel_debs()
    if debs:
        release, deb = debs[0]
        return extract_kernel_deb(release, deb, workdir / "kernel")
    raise GuestUnavailable(
        "no Debian kernel: install linux-image-cloud-amd64 (or linux-image-amd64), "
        "or leave a linux-image-*.deb in /var/cache/apt/archives"
    )


def find_busybox_static() -> Path:
    """busybox-static: the initramfs has no libc, so a dynamic busybox would not run."""
    for path in BUSYBOX_STATIC_CANDIDATES:
        if path.is_file() and _is_static_elf(path.read_bytes()):
            return path
    raise GuestUnavailable("busybox-static is not installed (a static busybox binary)")


def _is_static_elf(image: bytes) -> bool:
    """No PT_INTERP program header: the binary needs no dynamic loader."""
    if image[:4] != b"\x7fELF" or image[4] != 2:  # 64-bit only
        return False
    (phoff,) = struct.unpack_from("<Q", image, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", image, 0x36)
    for i in range(phnum):
        (p_type,) = struct.unpack_from("<I", image, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP
            return False
    return True


# ---- kernel modules -----------------------------------------------------------------------


def module_name(path: Path) -> str:
    name = path.name
    for suffix in _MODULE_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.replace("-", "_")


def read_module(path: Path) -> bytes:
    """The plain ELF of a module file, decompressed when needed."""
    raw = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(raw)
    if path.name.endswith(".ko.zst"):
        return zstandard.ZstdDecompressor().decompressobj().decompress(raw)
    return raw


def modinfo(elf: bytes) -> dict[str, list[str]]:
    """The key=value strings of a module's ``.modinfo`` section (64-bit little-endian ELF)."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise GuestUnavailable("a kernel module is not a 64-bit little-endian ELF file")
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        base = shoff + i * shentsize
        (name,) = struct.unpack_from("<I", elf, base)
        offset, size = struct.unpack_from("<QQ", elf, base + 0x18)
        return name, offset, size

    _, strtab, _ = section(shstrndx)
    info: dict[str, list[str]] = {}
    for i in range(shnum):
        name_off, offset, size = section(i)
        name = elf[strtab + name_off : elf.index(b"\0", strtab + name_off)]
        if name != b".modinfo":
            continue
        for entry in elf[offset : offset + size].split(b"\0"):
            key, sep, value = entry.decode(errors="replace").partition("=")
            if sep:
                info.setdefault(key, []).append(value)
    return info


@dataclass
class ModuleTree:
    """The modules of one kernel, by name, with builtins known."""

    root: Path
    files: dict[str, Path] = field(default_factory=dict)
    builtin: set[str] = field(default_factory=set)

    @classmethod
    def scan(cls, root: Path) -> ModuleTree:
        tree = cls(root)
        for path in (root / "kernel").rglob("*.ko*"):
            if path.name.endswith(_MODULE_SUFFIXES):
                tree.files[module_name(path)] = path
        builtin = root / "modules.builtin"
        if builtin.exists():
            tree.builtin = {module_name(Path(line)) for line in builtin.read_text().split()}
        return tree

    def dependencies(self, name: str) -> list[str]:
        info = modinfo(read_module(self.files[name]))
        deps = [d for value in info.get("depends", []) for d in value.split(",") if d]
        for value in info.get("softdep", []):  # e.g. "pre: crc32c"
            words = value.split()
            if "pre:" in words:
                end = words.index("post:") if "post:" in words else len(words)
                deps += words[words.index("pre:") + 1 : end]
        return [d.replace("-", "_") for d in deps]

    def _generic_provider(self, name: str) -> str | None:
        """The module behind a soft dependency on a crypto algorithm: ext4 asks for
        ``crypto-crc32c``, an alias that crc32c_generic provides (the CPU-specific drivers
        may not load under TCG's CPU model, the generic one always does).  None when the
        algorithm is built in or unknown: the kernel then has what it needs or will say so."""
        alg = name.removeprefix("crypto_")
        for candidate in (f"{alg}_generic", alg):
            if candidate in self.files:
                return candidate
        return None

    def load_order(self, wanted: Iterable[str]) -> list[str]:
        """Modules to insmod, dependencies first; builtins and unknown soft deps dropped."""
        order: list[str] = []
        visiting: set[str] = set()

        def visit(name: str, required: bool) -> None:
            if name in order or name in self.builtin:
                return
            if name not in self.files:
                generic = self._generic_provider(name)
                if generic is not None:
                    visit(generic, False)
                elif required:
                    raise GuestUnavailable(f"kernel {self.root.name} has no module {name}")
                return
            if name in visiting:
                raise GuestUnavailable(f"module dependency loop at {name}")
            visiting.add(name)
            for dep in self.dependencies(name):
                visit(dep, required=False)
            visiting.discard(name)
            order.append(name)

        for name in wanted:
            visit(name, required=True)
        return order


# ---- the initramfs -------------------------------------------------------------------------

S_IFDIR, S_IFREG, S_IFLNK, S_IFCHR = 0o040000, 0o100000, 0o120000, 0o020000


class CpioWriter:
    """A cpio "newc" archive (the format the kernel unpacks into its rootfs)."""

    def __init__(self) -> None:
        self._out = bytearray()
        self._ino = 1

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        encoded = name.encode() + b"\0"
        fields = (
            self._ino, mode, 0, 0, 2 if mode & S_IFDIR == S_IFDIR else 1, 0, len(data),
            0, 0, rdev[0], rdev[1], len(encoded), 0,
        )  # fmt: skip
        self._ino += 1
        self._out += b"070701" + b"".join(b"%08x" % f for f in fields) + encoded
        self._pad()
        self._out += data
        self._pad()

    def _pad(self) -> None:
        self._out += b"\0" * (-len(self._out) % 4)

    def directory(self, name: str) -> None:
        self._entry(name, S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        self._out += b"\0" * (-len(self._out) % 512)
        return bytes(self._out)


def init_script(modules: Iterable[str], expected: dict[str, str]) -> str:
    """/init: check the known files, write new ones, re-read them uncached, report, power off.

    Environment from the kernel command line: ``e2e_token`` (written to /newfile.txt) and
    ``e2e_copy`` (a known file copied to /copy.bin, so the guest makes allocating writes).
    """
    manifest = "".join(f"{digest}  {name}\\n" for name, digest in sorted(expected.items()))
    loads = "\n".join(f"insmod /lib/modules/{m}.ko || fail 'insmod {m}'" for m in modules)
    return f"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /mnt /tmp
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
export PATH=/bin
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

fail() {{
    echo "{FAIL_MARKER}: $*"
    poweroff -f
    sleep 60
}}
step() {{ echo "e2e: $* ($(cut -d' ' -f1 /proc/uptime)s)"; }}

step "init started"
{loads}
n=0
while [ ! -b /dev/vda ]; do
    n=$((n + 1)); [ $n -gt 300 ] && fail "no /dev/vda after 30 s"
    usleep 100000
done
step "disk found"
mount -t ext4 /dev/vda /mnt || fail "mount /dev/vda"
step "mounted"
printf '{manifest}' > /tmp/expected.sha256
cd /mnt || fail "cd /mnt"
sha256sum -c /tmp/expected.sha256 || fail "known files differ"
step "known files verified"
[ -n "$e2e_token" ] || fail "no e2e_token on the kernel command line"
[ -n "$e2e_copy" ] || fail "no e2e_copy on the kernel command line"
echo "$e2e_token" > /mnt/newfile.txt || fail "write newfile.txt"
cp "/mnt/$e2e_copy" /mnt/copy.bin || fail "copy $e2e_copy"
sync || fail "sync"
echo 3 > /proc/sys/vm/drop_caches
[ "$(cat /mnt/newfile.txt)" = "$e2e_token" ] || fail "newfile.txt reads back wrong"
cmp "/mnt/$e2e_copy" /mnt/copy.bin || fail "copy.bin reads back wrong"
step "new files written and re-read"
cd /
umount /mnt || fail "umount"
step "unmounted"
echo "{PASS_MARKER}"
poweroff -f
sleep 60
"""


def build_initramfs(
    kernel: Kernel, busybox: Path, expected: dict[str, str], dest: Path
) -> tuple[str, ...]:
    """Write the initramfs to dest; return the modules /init loads, in order."""
    tree = ModuleTree.scan(kernel.modules_dir)
    order = tree.load_order(WANTED_MODULES)
    cpio = CpioWriter()
    for d in ("bin", "dev", "etc", "lib", "lib/modules", "mnt", "proc", "sys", "tmp"):
        cpio.directory(d)
    cpio.char_device("dev/console", 5, 1)
    cpio.char_device("dev/null", 1, 3)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    for name in order:
        cpio.file(f"lib/modules/{name}.ko", read_module(tree.files[name]))
    cpio.file("init", init_script(order, expected).encode(), 0o755)
    dest.write_bytes(cpio.finish())
    return tuple(order)


def build_guest(workdir: Path, expected: dict[str, str]) -> Guest:
    """Kernel + initramfs for the test files whose sha256 digests are ``expected``."""
    kernel = find_kernel(workdir)
    busybox = find_busybox_static()
    initrd = workdir / "initrd.cpio"
    modules = build_initramfs(kernel, busybox, expected, initrd)
    return Guest(kernel, initrd, modules)


# ---- the disk -------------------------------------------------------------------------------


def known_files(seed: int = 9) -> dict[str, bytes]:
    """The files put on the guest's disk: text, random data spanning many clusters, a subdir."""
    rng = random.Random(seed)
    return {
        "hello.txt": b"hello from the nbdserve end-to-end test\n",
        "data/random.bin": rng.randbytes(3 * 1024 * 1024 + 12345),
        "data/pattern.bin": bytes(range(256)) * 4096,
        "data/deep/small.txt": b"".join(b"line %d\n" % i for i in range(500)),
    }


def sha256_digests(files: dict[str, bytes]) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


def make_ext4(files: dict[str, bytes], staging: Path, image: Path, size_mib: int = 64) -> None:
    """An ext4 image holding files, made by mkfs.ext4 -d (no root, no mount).

    Inode tables and journal are written out at mkfs time, so the guest's ext4lazyinit
    thread does not zero them through the export while the test runs.
    """
    for name, data in files.items():
        path = staging / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    subprocess.run(
        [
            "mkfs.ext4", "-q", "-F", "-L", "e2e", "-b", "4096",
            "-E", "lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0",
            "-d", str(staging), str(image), f"{size_mib}M",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip


# ---- booting ----------------------------------------------------------------------------------


@dataclass
class BootResult:
    returncode: int | None  # None: killed at the timeout
    console: str
    seconds: float

    @property
    def passed(self) -> bool:
        return PASS_MARKER in self.console

    def failure(self) -> str | None:
        for line in self.console.splitlines():
            if FAIL_MARKER in line:
                return line.strip()
        return None


def accelerator() -> list[str]:
    """TCG unless NBDSERVE_E2E_ACCEL names another accelerator (e.g. ``kvm``).

    TCG is the default because it behaves the same everywhere: on hosts where /dev/kvm is
    nested virtualisation it can exist and still stop the guest with "KVM internal error",
    and TCG boots this guest in a few seconds anyway.
    """
    return ["-accel", os.environ.get("NBDSERVE_E2E_ACCEL", "tcg")]


def qemu_argv(guest: Guest, drive_uri: str, params: dict[str, str]) -> list[str]:
    append = " ".join(
        ["console=ttyS0", "panic=-1", "quiet", *(f"{k}={v}" for k, v in params.items())]
    )
    return [
        "qemu-system-x86_64", *accelerator(), "-m", "256", "-smp", "1",
        "-display", "none", "-no-reboot", "-nodefaults", "-serial", "stdio",
        "-kernel", str(guest.kernel.vmlinuz), "-initrd", str(guest.initrd),
        "-append", append,
        "-drive", f"file={drive_uri},format=raw,if=virtio,cache=writeback",
    ]  # fmt: skip


def boot(
    guest: Guest, drive_uri: str, params: dict[str, str], log: Path, timeout: float
) -> BootResult:
    """Boot the guest against the NBD export; the console goes to log (kept for failures)."""
    started = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            qemu_argv(guest, drive_uri, params),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            returncode: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            returncode = None
    seconds = time.monotonic() - started
    return BootResult(returncode, log.read_text(errors="replace"), seconds)


def console_tail(console: str, lines: int = 40) -> Iterator[str]:
    yield from console.splitlines()[-lines:]
