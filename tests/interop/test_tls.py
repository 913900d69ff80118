"""TLS (NBD_OPT_STARTTLS) with real clients: nbdinfo over nbds:// and qemu-img."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import require_tools
from tests.helpers import certs
from tests.helpers.server import export, run, running_server

MiB = 1024 * 1024


@dataclass
class Pki:
    server: Path  # server certificate directory
    client: Path  # trusts our CA, has a client certificate signed by it
    anonymous: Path  # trusts our CA, no client certificate
    wrong_ca: Path  # trusts another CA (must refuse our server)
    foreign_client: Path  # trusts our CA, client cert signed by another CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    require_tools("openssl")
    base = tmp_path_factory.mktemp("pki")
    ca = certs.make_ca(base, "ca")
    other = certs.make_ca(base, "otherca")
    server = certs.issue(base, "server", ca, server=True)
    client = certs.issue(base, "client", ca, server=False)
    foreign = certs.issue(base, "foreign", other, server=False)
    return Pki(
        server=certs.server_dir(base, ca, server),
        client=certs.client_dir(base, "client", ca[1], client),
        anonymous=certs.client_dir(base, "anon", ca[1], None),
        wrong_ca=certs.client_dir(base, "wrongca", other[1], client),
        foreign_client=certs.client_dir(base, "foreign", ca[1], foreign),
    )


@pytest.fixture
def disk(tmp_path: Path) -> tuple[Path, bytes]:
    data = random.Random(5).randbytes(2 * MiB)
    path = tmp_path / "disk.raw"
    path.write_bytes(data)
    return path, data


def nbds(port: int, name: str, certdir: Path) -> str:
    return f"nbds://127.0.0.1:{port}/{name}?tls-certificates={certdir}"


def qemu_opts(port: int, name: str, certdir: Path) -> list[str]:
    return [
        "--object",
        f"tls-creds-x509,id=tls0,dir={certdir},endpoint=client",
        "--image-opts",
        f"driver=nbd,host=127.0.0.1,port={port},export={name},tls-creds=tls0",
    ]


async def test_required_tls_with_nbdinfo_and_qemu_img(
    pki: Pki, disk: tuple[Path, bytes], tmp_path: Path
) -> None:
    require_tools("nbdinfo", "qemu-img")
    path, data = disk
    async with running_server(
        export(path, "disk"), tls="require", tls_certificates=str(pki.server)
    ) as srv:
        doc = json.loads(await run("nbdinfo", "--json", nbds(srv.port, "disk", pki.client)))
        assert doc["TLS"] is True
        assert doc["exports"][0]["export-size"] == len(data)
        out = tmp_path / "copy.raw"
        await run("qemu-img", "convert", *qemu_opts(srv.port, "disk", pki.client), "-O", "raw", out)
        assert out.read_bytes() == data
        # without TLS the export is not served at all
        plain = await run("nbdinfo", f"nbd://127.0.0.1:{srv.port}/disk", check=False)
        assert "disk" not in plain or "TLS" in plain
        assert "export-size" not in plain
        # and the server is still fine afterwards
        await run("nbdinfo", "--size", nbds(srv.port, "disk", pki.client))


async def test_plain_client_gets_tls_required(pki: Pki, disk: tuple[Path, bytes]) -> None:
    require_tools("nbdinfo")
    async with running_server(
        export(disk[0], "disk"), tls="require", tls_certificates=str(pki.server)
    ) as srv:
        result = await run("nbdinfo", "--json", f"nbd://127.0.0.1:{srv.port}/disk", check=False)
    assert "export-size" not in result


async def test_client_trusting_another_ca_refuses_the_server(
    pki: Pki, disk: tuple[Path, bytes]
) -> None:
    require_tools("nbdinfo")
    async with running_server(
        export(disk[0], "disk"), tls="require", tls_certificates=str(pki.server)
    ) as srv:
        out = await run("nbdinfo", "--size", nbds(srv.port, "disk", pki.wrong_ca), check=False)
        assert not out.strip().isdigit()
        # the failed handshake hurt nobody else
        ok = await run("nbdinfo", "--size", nbds(srv.port, "disk", pki.client))
    assert int(ok) == 2 * MiB


async def test_verify_peer_requires_a_client_certificate_from_our_ca(
    pki: Pki, disk: tuple[Path, bytes]
) -> None:
    require_tools("nbdinfo")
    async with running_server(
        export(disk[0], "disk"),
        tls="require",
        tls_certificates=str(pki.server),
        tls_verify_peer=True,
    ) as srv:
        ok = await run("nbdinfo", "--size", nbds(srv.port, "disk", pki.client))
        assert int(ok) == 2 * MiB
        for refused in (pki.anonymous, pki.foreign_client):
            out = await run("nbdinfo", "--size", nbds(srv.port, "disk", refused), check=False)
            assert not out.strip().isdigit(), refused
        assert int(await run("nbdinfo", "--size", nbds(srv.port, "disk", pki.client))) == 2 * MiB


async def test_selective_tls_hides_and_refuses_tls_only_exports(
    pki: Pki, disk: tuple[Path, bytes], tmp_path: Path
) -> None:
    require_tools("nbdinfo")
    public = tmp_path / "public.raw"
    public.write_bytes(bytes(MiB))
    async with running_server(
        export(disk[0], "secret", tls_required=True),
        export(public, "public"),
        tls="on",
        tls_certificates=str(pki.server),
    ) as srv:
        plain = f"nbd://127.0.0.1:{srv.port}"
        listed = json.loads(await run("nbdinfo", "--list", "--json", plain))
        assert [e["export-name"] for e in listed["exports"]] == ["public"]
        assert int(await run("nbdinfo", "--size", f"{plain}/public")) == MiB
        refused = await run("nbdinfo", "--size", f"{plain}/secret", check=False)
        assert not refused.strip().isdigit()
        secure = json.loads(
            await run(
                "nbdinfo",
                "--list",
                "--json",
                f"nbds://127.0.0.1:{srv.port}?tls-certificates={pki.client}",
            )
        )
        assert sorted(e["export-name"] for e in secure["exports"]) == ["public", "secret"]
        assert int(await run("nbdinfo", "--size", nbds(srv.port, "secret", pki.client))) == (
            2 * MiB
        )


async def test_access_control_by_address(tmp_path: Path) -> None:
    require_tools("nbdinfo")
    a = tmp_path / "a.raw"
    b = tmp_path / "b.raw"
    a.write_bytes(bytes(MiB))
    b.write_bytes(bytes(2 * MiB))
    async with running_server(
        export(a, "local", allow=("127.0.0.0/8",)),
        export(b, "elsewhere", allow=("10.0.0.0/8", "unix")),
    ) as srv:
        base = f"nbd://127.0.0.1:{srv.port}"
        listed = json.loads(await run("nbdinfo", "--list", "--json", base))
        assert [e["export-name"] for e in listed["exports"]] == ["local"]
        assert int(await run("nbdinfo", "--size", f"{base}/local")) == MiB
        denied = await run("nbdinfo", "--size", f"{base}/elsewhere", check=False)
        assert not denied.strip().isdigit()
