"""Command line: ``nbdserve serve|demo|img``.

Errors the user can fix (a missing file, a bad option, a port in use) are
printed as one line and exit with status 1; no traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Sequence

import trio

from nbdserve import __version__
from nbdserve.config import (
    DEFAULT_BIND,
    DEFAULT_PORT,
    ExportConfig,
    ServerConfig,
    load_config,
)
from nbdserve.errors import ConfigError, NbdServeError
from nbdserve.logformat import JsonFormatter, KeyValueFormatter

LOGGER = logging.getLogger("nbdserve")


class UsageError(NbdServeError):
    """Options that contradict each other: exit status 2, as argparse gives."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(*_log_settings(args))
    try:
        result: int = args.func(args)
        return result
    except UsageError as exc:
        print(f"nbdserve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (NbdServeError, OSError) as exc:
        print(f"nbdserve: error: {exc}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:
        # trio nurseries wrap startup errors; a user error still gets one line
        user_error = _first_user_error(group)
        if user_error is None:
            raise
        print(f"nbdserve: error: {user_error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _first_user_error(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found = _first_user_error(exc)
            if found is not None:
                return found
        elif isinstance(exc, NbdServeError | OSError):
            return exc
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nbdserve", description="Serve disk images over the NBD protocol."
    )
    parser.add_argument("--version", action="version", version=f"nbdserve {__version__}")
    _add_log_options(parser, "")
    sub = parser.add_subparsers(dest="command", required=True)
    # the server commands take the log options after their name too, as the README
    # shows them; separate dests, so `-v serve -v` counts twice instead of once
    server_log_options = argparse.ArgumentParser(add_help=False)
    _add_log_options(server_log_options, "sub_")

    serve = sub.add_parser(
        "serve",
        parents=[server_log_options],
        help="serve one image or the exports of a config file",
        epilog="With --config, the server-wide options given here (listener, limits, TLS, "
        "metrics) override the file's [server] values; the per-export options are for a "
        "single IMAGE and are refused with --config.",
    )
    serve.add_argument("image", nargs="?", help="image file to export")
    serve.add_argument("--config", help="TOML file describing the exports and listeners")
    serve.add_argument("-f", "--format", help="image format (default: probe)")
    serve.add_argument("-x", "--export", default=None, help="export name (default: empty)")
    serve.add_argument("-D", "--description", default=None, help="export description")
    serve.add_argument("-b", "--bind", default=None, help=f"TCP address (default {DEFAULT_BIND})")
    serve.add_argument(
        "-p", "--port", type=int, default=None, help=f"TCP port (default {DEFAULT_PORT}; 0 = any)"
    )
    serve.add_argument("-k", "--socket", help="listen on this Unix socket instead of TCP")
    serve.add_argument("-r", "--read-only", action="store_true", help="export read-only")
    serve.add_argument(
        "-e",
        "--shared",
        type=int,
        default=None,
        help="maximum simultaneous clients per export (default 0 = unlimited)",
    )
    serve.add_argument(
        "--backing-dir",
        action="append",
        default=None,
        help="directory backing files may come from (repeatable)",
    )
    serve.add_argument(
        "--cache",
        choices=["writeback", "none"],
        default=None,
        help="host page cache use: writeback (default) or none (O_DIRECT)",
    )
    serve.add_argument("--compress", action="store_true", help="qcow2: store writes compressed")
    serve.add_argument(
        "--no-locking", action="store_true", help="do not take QEMU-compatible image locks"
    )
    serve.add_argument(
        "--no-probe-raw",
        action="store_true",
        help="refuse images whose format cannot be recognised",
    )
    serve.add_argument(
        "--max-connections", type=int, default=None, help="clients at once (default 1024)"
    )
    serve.add_argument(
        "--tcp-congestion",
        metavar="NAME",
        default=None,
        help="TCP congestion control of client connections: auto (default: clients on "
        "this machine get cubic instead of a pacing one such as bbr), system, or a name",
    )
    serve.add_argument(
        "--allow",
        action="append",
        default=None,
        metavar="CIDR",
        help="client networks allowed to use the export (repeatable; "
        "'unix' for Unix-socket clients)",
    )
    serve.add_argument(
        "--metrics",
        metavar="[HOST:]PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (host default 127.0.0.1)",
    )
    serve.add_argument(
        "--tls",
        choices=["off", "on", "require"],
        default=None,
        help="TLS mode (default: require with --tls-certificates, else off)",
    )
    serve.add_argument(
        "--tls-certificates",
        metavar="DIR",
        help="directory with ca-cert.pem, server-cert.pem, server-key.pem",
    )
    serve.add_argument(
        "--tls-verify-peer",
        action="store_true",
        help="require client certificates signed by ca-cert.pem",
    )
    serve.add_argument("--tls-psk", metavar="FILE", help="TLS-PSK keys file (Python 3.13+)")
    serve.add_argument("--pid-file", help="write the server's PID here once listening")
    serve.set_defaults(func=cmd_serve)

    demo = sub.add_parser(
        "demo", parents=[server_log_options], help="serve a small built-in demo image"
    )
    demo.add_argument("-b", "--bind", default=DEFAULT_BIND)
    demo.add_argument("-p", "--port", type=int, default=DEFAULT_PORT)
    demo.set_defaults(func=cmd_demo)

    from nbdserve.img import add_img_parser

    add_img_parser(sub)
    return parser


def _add_log_options(parser: argparse.ArgumentParser, prefix: str) -> None:
    # the subcommand's copies default to SUPPRESS: absent, they leave the top level's alone
    count_default: object = argparse.SUPPRESS if prefix else 0
    format_default = argparse.SUPPRESS if prefix else "text"
    parser.add_argument(
        "-v",
        "--verbose",
        dest=f"{prefix}verbose",
        action="count",
        default=count_default,
        help="more logging",
    )
    parser.add_argument(
        "-q",
        "--quiet",
        dest=f"{prefix}quiet",
        action="count",
        default=count_default,
        help="less logging",
    )
    parser.add_argument(
        "--log-format",
        dest=f"{prefix}log_format",
        choices=["text", "json"],
        default=format_default,
        help="key=value lines (text, default) or one JSON object per line",
    )


def _log_settings(args: argparse.Namespace) -> tuple[int, str]:
    """Verbosity and format from the options before and after the subcommand."""
    verbosity = (
        args.verbose + getattr(args, "sub_verbose", 0) - args.quiet - getattr(args, "sub_quiet", 0)
    )
    return verbosity, getattr(args, "sub_log_format", args.log_format)


def setup_logging(verbosity: int, fmt: str = "text") -> None:
    level = {-2: logging.ERROR, -1: logging.WARNING, 0: logging.INFO}.get(
        verbosity, logging.DEBUG if verbosity > 0 else logging.CRITICAL
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


# serve options that describe the one export made from IMAGE: with --config the
# file's [[export]] tables say all that, and silently dropping them would serve
# something other than what the command line asked for
_EXPORT_OPTIONS = (
    ("format", "-f/--format"),
    ("export", "-x/--export"),
    ("description", "-D/--description"),
    ("read_only", "-r/--read-only"),
    ("shared", "-e/--shared"),
    ("backing_dir", "--backing-dir"),
    ("cache", "--cache"),
    ("compress", "--compress"),
    ("no_locking", "--no-locking"),
    ("no_probe_raw", "--no-probe-raw"),
    ("allow", "--allow"),
)


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    if args.config:
        return _config_file_with_overrides(args)
    if not args.image:
        raise UsageError("nothing to serve: give an IMAGE or --config FILE")
    if not os.path.exists(args.image):
        raise ConfigError(f"image {args.image} does not exist")
    export = ExportConfig(
        name=args.export or "",
        path=os.path.abspath(args.image),
        format=args.format,
        read_only=args.read_only,
        description=args.description or "",
        shared=args.shared or 0,
        backing_dirs=tuple(args.backing_dir) if args.backing_dir else None,
        probe_raw=not args.no_probe_raw,
        allow=tuple(args.allow) if args.allow else None,
        locking=not args.no_locking,
        cache=args.cache or "writeback",
        settings={"compress": True} if args.compress else {},
    )
    bind = None if args.socket and args.bind is None else (args.bind or DEFAULT_BIND)
    return ServerConfig(
        exports=(export,),
        bind=bind,
        port=DEFAULT_PORT if args.port is None else args.port,
        socket=args.socket,
        **_server_args(args),  # type: ignore[arg-type]
    )


def _config_file_with_overrides(args: argparse.Namespace) -> ServerConfig:
    """The config file, with the server-wide options given on the command line
    taking precedence over its [server] table (as nbdkit's and qemu-nbd's do)."""
    if args.image:
        raise UsageError("give either an IMAGE or --config, not both")
    for dest, flag in _EXPORT_OPTIONS:
        value = getattr(args, dest)
        # identity, not ==: "--shared 0" is given, though 0 == False
        if value is not None and value is not False:
            raise UsageError(
                f"{flag} applies to a single IMAGE; with --config set it per export "
                f"in {args.config}"
            )
    config = load_config(args.config)
    overrides = _server_args(args)
    if args.bind is not None:
        overrides["bind"] = args.bind
    if args.port is not None:
        overrides["port"] = args.port
    if args.socket is not None:
        overrides["socket"] = args.socket
    if not overrides:
        return config
    from dataclasses import replace

    # replace() re-runs the validation in ServerConfig.__post_init__
    return replace(config, **overrides)  # type: ignore[arg-type]


def _server_args(args: argparse.Namespace) -> dict[str, object]:
    """Server-wide settings given on the command line, besides the listener."""
    out = _tls_args(args)
    if args.metrics:
        out["metrics"] = args.metrics
    if args.max_connections is not None:
        out["max_connections"] = args.max_connections
    if args.tcp_congestion is not None:
        out["tcp_congestion"] = args.tcp_congestion
    return out


def _tls_args(args: argparse.Namespace) -> dict[str, object]:
    """TLS settings given on the command line (they override a config file's)."""
    out: dict[str, object] = {}
    if args.tls_certificates:
        out["tls_certificates"] = os.path.abspath(args.tls_certificates)
    if args.tls_psk:
        out["tls_psk_file"] = os.path.abspath(args.tls_psk)
    if args.tls_verify_peer:
        out["tls_verify_peer"] = True
    if args.tls is not None:
        out["tls"] = args.tls
    elif args.tls_certificates or args.tls_psk:
        out["tls"] = "require"  # as qemu-nbd: credentials given means TLS is wanted
    return out


def cmd_serve(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    reload = (lambda: config_from_args(args)) if args.config else None
    run_server(config, pid_file=args.pid_file, reload=reload)
    return 0


def run_server(
    config: ServerConfig,
    *,
    pid_file: str | None = None,
    on_ready: object = None,
    reload: Callable[[], ServerConfig] | None = None,
) -> None:
    from nbdserve.server.serve import ServerHandle, serve

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            handle: ServerHandle = await nursery.start(
                lambda task_status: serve(
                    config, task_status=task_status, handle_signals=True, reload=reload
                )
            )
            if pid_file:
                with open(pid_file, "w") as f:
                    f.write(f"{os.getpid()}\n")
            if callable(on_ready):
                on_ready(handle)

    try:
        trio.run(main)
    finally:
        if pid_file:
            try:
                os.unlink(pid_file)
            except OSError:
                pass


def cmd_demo(args: argparse.Namespace) -> int:
    from nbdserve.demo import make_demo_image

    with tempfile.TemporaryDirectory(prefix="nbdserve-demo-") as tmp:
        path = make_demo_image(tmp)
        export = ExportConfig(
            name="demo", path=path, format="raw", description="nbdserve built-in demo disk"
        )
        config = ServerConfig(exports=(export,), bind=args.bind, port=args.port)

        def ready(handle: object) -> None:
            from nbdserve.server.serve import ServerHandle

            assert isinstance(handle, ServerHandle)
            host, port = handle.tcp_addresses[0]
            uri = f"nbd://{host}:{port}/demo"
            print(f"nbdserve demo: serving {path}", flush=True)
            print(f"  URI: {uri}", flush=True)
            print("  try:", flush=True)
            print(f"    qemu-img info {uri}", flush=True)
            print(f"    nbdinfo {uri}", flush=True)
            print("  press Ctrl-C to stop", flush=True)

        run_server(config, on_ready=ready)
    return 0


if __name__ == "__main__":
    sys.exit(main())
