"""X.509 test PKI made with the openssl CLI: CAs, a server cert, client certs.

Directories follow the qemu/nbdkit/libnbd layout: servers read ca-cert.pem,
server-cert.pem and server-key.pem; clients read ca-cert.pem,
client-cert.pem and client-key.pem.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True)


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    key, cert = directory / f"{name}-key.pem", directory / f"{name}-cert.pem"
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
        "-keyout",
        key,
        "-out",
        cert,
        cwd=directory,
    )
    return key, cert


def issue(directory: Path, name: str, ca: tuple[Path, Path], *, server: bool) -> tuple[Path, Path]:
    """A certificate for ``name`` signed by ``ca``; server certs name 127.0.0.1/localhost."""
    ca_key, ca_cert = ca
    key, csr, cert = (directory / f"{name}-{s}" for s in ("key.pem", "req.pem", "cert.pem"))
    ext = directory / f"{name}.ext"
    usage = "serverAuth" if server else "clientAuth"
    ext.write_text(
        f"basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
        f"extendedKeyUsage={usage}\n"
        + ("subjectAltName=IP:127.0.0.1,DNS:localhost\n" if server else "")
    )
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        f"/CN={name}",
        "-keyout",
        key,
        "-out",
        csr,
        cwd=directory,
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        csr,
        "-CA",
        ca_cert,
        "-CAkey",
        ca_key,
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        ext,
        "-out",
        cert,
        cwd=directory,
    )
    return key, cert


def server_dir(base: Path, ca: tuple[Path, Path], server: tuple[Path, Path]) -> Path:
    d = base / "server"
    d.mkdir(parents=True, exist_ok=True)
    shutil.copy(ca[1], d / "ca-cert.pem")
    shutil.copy(server[1], d / "server-cert.pem")
    shutil.copy(server[0], d / "server-key.pem")
    return d


def client_dir(base: Path, name: str, ca_cert: Path, client: tuple[Path, Path] | None) -> Path:
    d = base / name
    d.mkdir(parents=True, exist_ok=True)
    shutil.copy(ca_cert, d / "ca-cert.pem")
    if client is not None:
        shutil.copy(client[1], d / "client-cert.pem")
        shutil.copy(client[0], d / "client-key.pem")
    return d
