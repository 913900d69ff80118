"""The server's log as an operator reads it: a real ``python -m nbdserve serve`` with real
clients, its output parsed line by line in both formats (key=value text and JSON)."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from nbdserve.errors import NbdErrno
from nbdserve.logformat import JsonFormatter, KeyValueFormatter, parse_fields
from tests.conftest import require_tools
from tests.helpers import qcow2_patch
from tests.helpers.client import NbdClient, NbdError
from tests.helpers.server import free_port, server_process

SIZE = 1 << 20
READS = 300
# TIME level=... logger=... then the event's key=value pairs
_TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} level=(\w+) logger=(\S+) (.*)$")


def parse_log(text: str, fmt: str) -> list[dict[str, object]]:
    """Every line as a dict of its fields; fails the test on a line that is not one event."""
    records = []
    for line in text.splitlines():
        if fmt == "json":
            record = json.loads(line)
        else:
            match = _TEXT_LINE.match(line)
            assert match, f"not a key=value log line: {line!r}"
            fields = parse_fields(match.group(3))
            assert fields is not None, f"not key=value: {line!r}"
            record = {"level": match.group(1), "logger": match.group(2), **fields}
        assert isinstance(record, dict)
        assert "event" in record, f"no event field: {line!r}"
        records.append(record)
    return records


def events(records: list[dict[str, object]], name: str) -> list[dict[str, object]]:
    return [r for r in records if r["event"] == name]


async def read_many(port: int, export: str, count: int) -> str:
    """Read ``count`` blocks; returns the client's own address as the server sees it."""
    async with await NbdClient.connect_tcp("127.0.0.1", port) as client:
        assert isinstance(client.stream, trio.SocketStream)
        host, cport = client.stream.socket.getsockname()[:2]
        await client.go(export)
        for i in range(count):
            await client.read((i * 4096) % SIZE, 4096)
        await client.disconnect()
    return f"{host}:{cport}"


async def read_past_end(port: int, export: str, length: int = 4096) -> int:
    """A request the server must refuse (or fail); returns the NBD error code."""
    async with await NbdClient.connect_tcp("127.0.0.1", port) as client:
        await client.go(export)
        with pytest.raises(NbdError) as exc:
            await client.read(SIZE, length)
        await client.disconnect()
    return exc.value.code


def run_logged(tmp_path: Path, args: list[str], client: object) -> str:
    """Serve with ``args``, run the async ``client(port)``, stop; return the whole log."""
    port = free_port()
    log = tmp_path / "server.log"
    with server_process([*args, "--port", str(port)], port=port, log_path=log):
        trio.run(client, port)  # type: ignore[arg-type]
    return log.read_text()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(SIZE))
    return path


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_connection_lines_name_client_and_export_and_requests_are_not_logged(
    tmp_path: Path, image: Path, fmt: str
) -> None:
    seen: list[str] = []

    async def client(port: int) -> None:
        seen.append(await read_many(port, "disk", READS))

    text = run_logged(tmp_path, ["serve", "--log-format", fmt, "-x", "disk", str(image)], client)
    records = parse_log(text, fmt)
    attach = [r for r in events(records, "attach") if r["client"] == seen[0]]
    assert [r["export"] for r in attach] == ["disk"]
    gone = [r for r in events(records, "disconnect") if r["client"] == seen[0]]
    assert len(gone) == 1
    assert gone[0]["export"] == "disk"
    assert gone[0]["requests"] == READS + 1  # and the disconnect request
    # hundreds of reads, and the log is the same handful of lifecycle lines
    assert len(records) < 15, text
    assert not [r for r in records if str(r["event"]).startswith("request")]


def test_json_fields_are_typed_and_free_text_is_whole(tmp_path: Path) -> None:
    """An export name with spaces stays one field; counts are JSON numbers."""
    image = tmp_path / "a disk.raw"
    image.write_bytes(bytes(SIZE))

    async def client(port: int) -> None:
        await read_many(port, "my disk", 3)

    text = run_logged(
        tmp_path, ["serve", "--log-format", "json", "-x", "my disk", str(image)], client
    )
    records = parse_log(text, "json")
    (opened,) = events(records, "export-open")
    assert opened["export"] == "my disk"
    assert opened["path"] == str(image)
    assert opened["size"] == SIZE
    assert "message" not in opened  # fields, not one wrapped string
    assert [r["export"] for r in events(records, "disconnect")] == ["my disk"]


def test_nbdinfo_connection_is_logged_with_its_export(tmp_path: Path, image: Path) -> None:
    require_tools("nbdinfo")

    async def client(port: int) -> None:
        await trio.run_process(["nbdinfo", f"nbd://127.0.0.1:{port}/disk"], capture_stdout=True)

    records = parse_log(
        run_logged(tmp_path, ["serve", "--log-format", "json", "-x", "disk", str(image)], client),
        "json",
    )
    (attach,) = events(records, "attach")
    (gone,) = [r for r in events(records, "disconnect") if r["export"] == "disk"]
    assert attach["client"] == gone["client"]
    assert re.fullmatch(r"127\.0\.0\.1:\d+", str(attach["client"]))


def test_client_mistakes_are_logged_only_with_verbose(tmp_path: Path, image: Path) -> None:
    """A read past the end is the client's error: silent by default (a client must not be
    able to flood the log), a debug line with the request and who sent it under -v."""
    codes: list[int] = []

    async def client(port: int) -> None:
        codes.append(await read_past_end(port, "disk"))

    quiet = parse_log(run_logged(tmp_path, ["serve", "-x", "disk", str(image)], client), "text")
    assert not [r for r in quiet if str(r["event"]).startswith("request")]
    verbose = parse_log(
        run_logged(tmp_path, ["serve", "-v", "-x", "disk", str(image)], client), "text"
    )
    (line,) = events(verbose, "request-invalid")
    assert codes == [NbdErrno.EINVAL, NbdErrno.EINVAL]
    assert line["export"] == "disk"
    assert re.fullmatch(r"127\.0\.0\.1:\d+", str(line["client"]))
    assert (line["cmd"], line["offset"], line["length"]) == ("READ", SIZE, 4096)
    assert line["errno"] == "EINVAL"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_server_side_failures_are_logged_by_default(tmp_path: Path, fmt: str) -> None:
    """An image that cannot be read (a qcow2 data cluster past the end of its file) fails
    the request with EIO, logged at warning with client, export and request."""
    require_tools("qemu-img", "qemu-io")
    image = tmp_path / "broken.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
    subprocess.run(
        ["qemu-io", "-c", "write -P 0x55 0 64k", str(image)], check=True, capture_output=True
    )
    entry = qcow2_patch.l2_entry_at(image, 0)
    flags = qcow2_patch.u64(image, entry) & ~0x00FFFFFFFFFFFE00
    qcow2_patch.put_u64(image, entry, flags | (1 << 30))
    seen: list[str] = []

    async def client(port: int) -> None:
        async with await NbdClient.connect_tcp("127.0.0.1", port) as c:
            assert isinstance(c.stream, trio.SocketStream)
            host, cport = c.stream.socket.getsockname()[:2]
            seen.append(f"{host}:{cport}")
            await c.go("vm")
            with pytest.raises(NbdError) as exc:
                await c.read(8192, 512)
            assert exc.value.code == NbdErrno.EIO
            await c.disconnect()

    args = ["serve", "--log-format", fmt, "-r", "-x", "vm", str(image)]
    records = parse_log(run_logged(tmp_path, args, client), fmt)
    (line,) = events(records, "request-failed")
    assert line["level"] == "warning"
    assert (line["client"], line["export"]) == (seen[0], "vm")
    assert (line["cmd"], line["offset"], line["length"]) == ("READ", 8192, 512)
    assert line["errno"] == "EIO"
    assert "past the end" in str(line["error"])


def test_json_traceback_is_one_field_on_one_line() -> None:
    """Unexpected exceptions (logged with their traceback) stay one JSON line per event."""
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord(
            "nbdserve.server.dispatch",
            logging.ERROR,
            __file__,
            1,
            "event=request-crash client=%s export=%s",
            ("127.0.0.1:1", "vm"),
            sys.exc_info(),
        )
    line = JsonFormatter().format(record)
    assert "\n" not in line
    doc = json.loads(line)
    assert (doc["event"], doc["client"], doc["export"]) == ("request-crash", "127.0.0.1:1", "vm")
    assert "Traceback" in doc["exception"]
    assert "ValueError: boom" in doc["exception"]
    # text keeps the traceback readable, under its event line
    assert (
        KeyValueFormatter()
        .format(record)
        .splitlines()[0]
        .endswith("event=request-crash client=127.0.0.1:1 export=vm")
    )


def test_messages_that_are_not_key_value_are_kept_whole() -> None:
    record = logging.LogRecord("trio", logging.WARNING, __file__, 1, "plain text", (), None)
    assert json.loads(JsonFormatter().format(record))["message"] == "plain text"
    assert parse_fields("event=x path='a b' n=3 r=0.5") == {
        "event": "x",
        "path": "a b",
        "n": 3,
        "r": 0.5,
    }
    assert parse_fields("opened x as raw") is None
