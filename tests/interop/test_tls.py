"""TLS (NBD_OPT_STARTTLS) with real clients: nbdinfo over nbds:// and qemu-img."""

from __future__ import annotations

import json
import os
import random
import ssl
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from nbdserve.block.file import FileBackend
from nbdserve.protocol.constants import Opt, Rep
from tests.conftest import require_tools
from tests.helpers import certs
from tests.helpers import client as cl
from tests.helpers.client import NbdClient
from tests.helpers.server import export, free_port, run, running_server, server_process

MiB = 1024 * 1024
# libnbd's debug log shows the message of an option error reply
LIBNBD_DEBUG = {**os.environ, "LIBNBD_DEBUG": "1"}
TLS_REQD_SEEN = "server error message: TLS is required"


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


async def test_large_reads_over_tls_are_read_inline_not_sent_from_the_file(
    pki: Pki, disk: tuple[Path, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sendfile cannot write into a TLS stream: large reads over TLS are read into a
    buffer and encrypted, never handed to the zero-copy path (which over TLS would
    read each piece in a worker thread)."""
    require_tools("nbdcopy")
    path, data = disk
    zero_copy: list[tuple[int, int]] = []
    original = FileBackend.sendfile_pieces

    def noting(file: FileBackend, pieces: Sequence[tuple[int, int]]) -> object:
        zero_copy.extend(pieces)
        return original(file, pieces)

    monkeypatch.setattr(FileBackend, "sendfile_pieces", noting)
    async with running_server(
        export(path, "disk"), tls="require", tls_certificates=str(pki.server)
    ) as srv:
        out = tmp_path / "copy.raw"
        uri = nbds(srv.port, "disk", pki.client)
        await run("nbdcopy", "--request-size=262144", uri, out)
        assert out.read_bytes() == data
    assert zero_copy == []


async def test_plain_client_gets_tls_required(pki: Pki, disk: tuple[Path, bytes]) -> None:
    require_tools("nbdinfo")
    async with running_server(
        export(disk[0], "disk"), tls="require", tls_certificates=str(pki.server)
    ) as srv:
        with trio.fail_after(60):
            result = await trio.run_process(
                ["nbdinfo", "--json", f"nbd://127.0.0.1:{srv.port}/disk"],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env=LIBNBD_DEBUG,
            )
    assert result.returncode != 0
    assert b"export-size" not in result.stdout
    # the refusal is the server's NBD_REP_ERR_TLS_REQD (its message, in libnbd's debug log)
    assert TLS_REQD_SEEN in result.stderr.decode(), result.stderr


def client_context(certdir: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certdir / "ca-cert.pem"))
    if (certdir / "client-cert.pem").exists():
        ctx.load_cert_chain(certdir / "client-cert.pem", certdir / "client-key.pem")
    return ctx


async def test_forced_tls_refuses_options_before_starttls(
    pki: Pki, disk: tuple[Path, bytes]
) -> None:
    """FORCEDTLS at the wire: LIST, INFO, GO (and the rest) get NBD_REP_ERR_TLS_REQD,
    the connection stays open, and STARTTLS then unlocks them."""
    path, data = disk
    async with running_server(
        export(path, "disk"), tls="require", tls_certificates=str(pki.server)
    ) as srv:
        with trio.fail_after(30):
            c = await NbdClient.connect_tcp("127.0.0.1", srv.port)
            await c.handshake()
            for raw, opt in (
                (cl.opt_list(), Opt.LIST),
                (cl.opt_info("disk"), Opt.INFO),
                (cl.opt_go("disk"), Opt.GO),
                (cl.opt_structured_reply(), Opt.STRUCTURED_REPLY),
                (cl.opt_list_meta_context("disk", ["base:"]), Opt.LIST_META_CONTEXT),
                (cl.opt_info("no-such-export"), Opt.INFO),
            ):
                replies = await c.option(raw)
                assert len(replies) == 1, replies
                (reply,) = replies
                assert reply.option == opt
                assert reply.reply_type == 0x80000005 == int(Rep.ERR_TLS_REQD), reply
                assert "TLS" in reply.message()
            # still the same connection: the upgrade works and the options are served
            (ack,) = await c.option(cl.opt_starttls())
            assert (ack.option, ack.reply_type) == (Opt.STARTTLS, Rep.ACK)
            assert c.codec.buffered == 0
            tls = trio.SSLStream(c.stream, client_context(pki.client), server_hostname="127.0.0.1")
            await tls.do_handshake()
            c.stream = tls
            assert [name for name, _ in await c.list_exports()] == ["disk"]
            (again,) = await c.option(cl.opt_starttls())  # already upgraded
            assert again.reply_type == Rep.ERR_INVALID
            info = await c.go("disk")
            assert info.size == len(data)
            assert await c.read(0, 4096) == data[:4096]
            await c.disconnect()
            await c.aclose()


async def test_export_name_before_starttls_closes(pki: Pki, disk: tuple[Path, bytes]) -> None:
    """NBD_OPT_EXPORT_NAME has no error reply: under FORCEDTLS the server hangs up."""
    async with running_server(
        export(disk[0], "disk"), tls="require", tls_certificates=str(pki.server)
    ) as srv:
        with trio.fail_after(30):
            c = await NbdClient.connect_tcp("127.0.0.1", srv.port)
            await c.handshake()
            await c.send(cl.opt_export_name("disk"))
            assert await c.receive_eof() == b""
            await c.aclose()


def test_serve_cli_tls_flags_with_nbdinfo(pki: Pki, disk: tuple[Path, bytes]) -> None:
    """--tls-certificates DIR --tls=require --tls-verify-peer through the real CLI."""
    require_tools("nbdinfo")
    path, data = disk
    port = free_port()
    argv = [
        "serve",
        str(path),
        "-x",
        "disk",
        "-p",
        str(port),
        "--tls-certificates",
        str(pki.server),
        "--tls=require",
        "--tls-verify-peer",
    ]

    def nbdinfo(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["nbdinfo", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=LIBNBD_DEBUG,
        )

    with server_process(argv, port=port):
        ok = nbdinfo("--json", nbds(port, "disk", pki.client))
        assert ok.returncode == 0, ok.stderr
        doc = json.loads(ok.stdout)
        assert doc["TLS"] is True
        assert doc["exports"][0]["export-size"] == len(data)
        # --tls=require: plain NBD is refused with NBD_REP_ERR_TLS_REQD
        plain = nbdinfo("--size", f"nbd://127.0.0.1:{port}/disk")
        assert plain.returncode != 0
        assert TLS_REQD_SEEN in plain.stderr
        # --tls-verify-peer: a client without a certificate is refused
        anon = nbdinfo("--size", nbds(port, "disk", pki.anonymous))
        assert anon.returncode != 0
        assert not anon.stdout.strip()
        # and the server still serves a proper client afterwards
        again = nbdinfo("--size", nbds(port, "disk", pki.client))
        assert again.returncode == 0
        assert int(again.stdout) == len(data)


@pytest.mark.skipif(
    hasattr(ssl.SSLContext, "set_psk_server_callback"),
    reason="this Python supports TLS-PSK (3.13+)",
)
@pytest.mark.parametrize("how", ["flag", "config"])
def test_tls_psk_needs_python_3_13(tmp_path: Path, disk: tuple[Path, bytes], how: str) -> None:
    keys = tmp_path / "keys.psk"
    keys.write_text("alice:" + "ab" * 32 + "\n")
    port = free_port()
    if how == "flag":
        argv = ["serve", str(disk[0]), "-p", str(port), "--tls-psk", str(keys)]
    else:
        cfg = tmp_path / "nbdserve.toml"
        cfg.write_text(
            f'[server]\nport = {port}\ntls = "require"\ntls_psk_file = "{keys}"\n'
            f'[[export]]\nname = "disk"\npath = "{disk[0]}"\n'
        )
        argv = ["serve", "--config", str(cfg)]
    result = subprocess.run(
        [sys.executable, "-m", "nbdserve", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # a user error: one line naming the limitation, status 1 (cli.py's convention)
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("nbdserve: error: TLS-PSK needs Python 3.13"), result.stderr


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
