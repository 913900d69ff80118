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

LOGGER = logging.getLogger("nbdserve")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose - args.quiet, getattr(args, "log_format", "text"))
    try:
        result: int = args.func(args)
        return result
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
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="less logging")
    parser.add_argument("--log-format", choices=["text", "json"], default="text")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve one image or the exports of a config file")
    serve.add_argument("image", nargs="?", help="image file to export")
    serve.add_argument("--config", help="TOML file describing the exports and listeners")
    serve.add_argument("-f", "--format", help="image format (default: probe)")
    serve.add_argument("-x", "--export", default="", help="export name (default: empty)")
    serve.add_argument("-D", "--description", default="", help="export description")
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
        default=0,
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
        default="writeback",
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
    serve.add_argument("--max-connections", type=int, default=None)
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

    demo = sub.add_parser("demo", help="serve a small built-in demo image")
    demo.add_argument("-b", "--bind", default=DEFAULT_BIND)
    demo.add_argument("-p", "--port", type=int, default=DEFAULT_PORT)
    demo.set_defaults(func=cmd_demo)

    from nbdserve.img import add_img_parser

    add_img_parser(sub)
    return parser


class _KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = (
            f"{self.formatTime(record)} level={record.levelname.lower()} "
            f"logger={record.name} {record.getMessage()}"
        )
        if record.exc_info:
            base += "\n" + self.formatException(record.exc_info)
        return base


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        import json

        doc: dict[str, object] = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def setup_logging(verbosity: int, fmt: str = "text") -> None:
    level = {-2: logging.ERROR, -1: logging.WARNING, 0: logging.INFO}.get(
        verbosity, logging.DEBUG if verbosity > 0 else logging.CRITICAL
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    if args.config:
        if args.image:
            raise ConfigError("give either an IMAGE or --config, not both")
        config = load_config(args.config)
        overrides: dict[str, object] = {}
        if args.bind is not None:
            overrides["bind"] = args.bind
        if args.port is not None:
            overrides["port"] = args.port
        if args.socket is not None:
            overrides["socket"] = args.socket
        overrides.update(_tls_args(args))
        if args.metrics:
            overrides["metrics"] = args.metrics
        if overrides:
            from dataclasses import replace

            config = replace(config, **overrides)  # type: ignore[arg-type]
        return config
    if not args.image:
        raise ConfigError("nothing to serve: give an IMAGE or --config FILE")
    if not os.path.exists(args.image):
        raise ConfigError(f"image {args.image} does not exist")
    export = ExportConfig(
        name=args.export,
        path=os.path.abspath(args.image),
        format=args.format,
        read_only=args.read_only,
        description=args.description,
        shared=args.shared,
        backing_dirs=tuple(args.backing_dir) if args.backing_dir else None,
        probe_raw=not args.no_probe_raw,
        allow=tuple(args.allow) if args.allow else None,
        locking=not args.no_locking,
        cache=args.cache,
        settings={"compress": True} if args.compress else {},
    )
    bind = None if args.socket and args.bind is None else (args.bind or DEFAULT_BIND)
    kwargs: dict[str, object] = _tls_args(args)
    if args.metrics:
        kwargs["metrics"] = args.metrics
    if args.max_connections is not None:
        kwargs["max_connections"] = args.max_connections
    return ServerConfig(
        exports=(export,),
        bind=bind,
        port=DEFAULT_PORT if args.port is None else args.port,
        socket=args.socket,
        **kwargs,  # type: ignore[arg-type]
    )


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
            name="demo", path=path, format=None, description="nbdserve built-in demo disk"
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
