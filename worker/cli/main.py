"""``utxoiq-worker``: the one entry point (also ``python -m worker``)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from handlers import registry as topic_registry
from worker import logs
from worker.config import Settings
from worker.exceptions import WorkerError
from worker.pipeline.settings import BatchSettings
from worker.sources.settings import PullSettings
from worker.supervisor import add_process_options, run_on_cores

log = logging.getLogger(__name__)
T = TypeVar("T")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="utxoiq-worker", description="utxoIQ persistence worker (Pub/Sub to PostgreSQL)"
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("LOG_LEVEL", "INFO"),
        help="log level (env LOG_LEVEL, default INFO)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    migrate = commands.add_parser("migrate", help="create the database if missing and upgrade it")
    migrate.add_argument(
        "--revision",
        default=os.environ.get("MIGRATE_REVISION", "head"),
        help="target revision (env MIGRATE_REVISION, default head)",
    )
    downgrade = commands.add_parser("downgrade", help="downgrade the schema (base drops it all)")
    downgrade.add_argument("revision", help="target revision, e.g. base")

    commands.add_parser("demo", help="migrate, store sample data, print what was stored")

    topology = commands.add_parser("topology", help="Pub/Sub topics and subscriptions")
    topology.add_argument("action", choices=["apply", "render"])
    topology.add_argument(
        "--push-endpoint",
        default=os.environ.get("PUSH_ENDPOINT"),
        help="base URL of `serve`: create push subscriptions to URL/push/TOPIC (env PUSH_ENDPOINT)",
    )

    serve = commands.add_parser("serve", help="the HTTP app (read API, health) on PORT")
    serve.add_argument(
        "--host", default=os.environ.get("HOST", "0.0.0.0"), help="bind address (env HOST)"
    )
    add_process_options(serve)

    _add_run(commands.add_parser("run", help="the pull worker"))
    from worker.cli import backup

    backup.add_parser(commands)
    from worker.cli import retention

    retention.add_parsers(commands)
    from worker.cli import dlq

    dlq.add_parsers(commands)
    return parser


def _add_run(run: argparse.ArgumentParser) -> None:
    add_process_options(run)
    run.add_argument(
        "--only",
        action="append",
        metavar="TOPIC",
        default=_env_list("WORKER_TOPICS"),
        help="consume only this topic (repeatable; env WORKER_TOPICS, comma list)",
    )
    defaults_b, defaults_p = BatchSettings(), PullSettings()
    for name, default, text in (
        ("max-batch-size", defaults_b.max_batch_size, "messages per batch"),
        ("max-batch-bytes", defaults_b.max_batch_bytes, "message data per batch"),
        ("max-batch-delay-ms", defaults_b.max_batch_delay_ms, "oldest message's longest wait"),
        (
            "max-concurrent-flushes",
            defaults_b.max_concurrent_flushes,
            "batches in flight per topic",
        ),
        ("pullers", defaults_p.pullers, "concurrent pulls per subscription"),
        (
            "max-outstanding-messages",
            defaults_p.max_outstanding_messages,
            "received, not yet settled (per topic)",
        ),
        ("max-outstanding-bytes", defaults_p.max_outstanding_bytes, "same, in bytes"),
    ):
        env = "WORKER_" + name.upper().replace("-", "_")
        run.add_argument(
            f"--{name}",
            type=int,
            default=int(os.environ.get(env, default)),
            help=f"{text} (env {env}, default {default})",
        )


def _env_list(name: str) -> list[str] | None:
    raw = os.environ.get(name, "")
    values = [v.strip() for v in raw.split(",") if v.strip()]
    return values or None


# The topic registry is built by the commands that need it: it loads every topic's
# module, the Pub/Sub and Redis clients among them, which a backup or retention run
# has no use for (a second of start-up and tens of MB of memory).
Command = Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]]


async def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    from worker.storage.migrate import upgrade

    await upgrade(settings, topic_registry(), args.revision)
    return 0


async def _downgrade(args: argparse.Namespace, settings: Settings) -> int:
    from worker.storage.migrate import downgrade

    await downgrade(settings, args.revision)
    return 0


async def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from worker.cli.demo import run_demo

    return await run_demo(settings, topic_registry())


async def _topology(args: argparse.Namespace, settings: Settings) -> int:
    from worker.pubsub import topology

    registry = topic_registry()
    if args.action == "render":
        sys.stdout.write(topology.render_json(registry, args.push_endpoint))
    else:
        counts = await topology.apply(settings, registry, args.push_endpoint)
        print(" ".join(f"{k}={v}" for k, v in counts.items()))
    return 0


async def _serve(args: argparse.Namespace, settings: Settings) -> int:
    # The supervisor of several processes imports neither the app nor the topics.
    async def serve_one(sock: socket.socket, ready_fd: int | None) -> int:
        from worker.http.serve import serve

        return await serve(settings, topic_registry(), sock, ready_fd)

    return await run_on_cores(args, args.host, settings.port, serve_one)


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    from worker.sources.pull_worker import run_worker

    registry = topic_registry()
    for name in args.only or ():
        registry[name]  # an unknown topic is refused before anything starts
    batch = BatchSettings(
        max_batch_size=args.max_batch_size,
        max_batch_bytes=args.max_batch_bytes,
        max_batch_delay_ms=args.max_batch_delay_ms,
        max_concurrent_flushes=args.max_concurrent_flushes,
    )
    pull = PullSettings(
        pullers=args.pullers,
        max_outstanding_messages=args.max_outstanding_messages,
        max_outstanding_bytes=args.max_outstanding_bytes,
    )
    topics = tuple(args.only or registry.pulled_by_default())

    async def run_one(sock: socket.socket, ready_fd: int | None) -> int:
        return await run_worker(settings, registry, topics, sock, batch, pull, ready_fd)

    return await run_on_cores(args, "0.0.0.0", settings.port, run_one)


async def _backup(args: argparse.Namespace, settings: Settings) -> int:
    from worker.cli import backup

    return await backup.command(args, settings)


async def _retention(args: argparse.Namespace, settings: Settings) -> int:
    from worker.cli import retention

    return await retention.retention(args, settings)


async def _archive(args: argparse.Namespace, settings: Settings) -> int:
    from worker.cli import retention

    return await retention.archive(args, settings)


async def _dlq(args: argparse.Namespace, settings: Settings) -> int:
    from worker.cli import dlq

    return await dlq.command(args, settings, topic_registry())


COMMANDS: dict[str, Command] = {
    "migrate": _migrate,
    "downgrade": _downgrade,
    "demo": _demo,
    "topology": _topology,
    "serve": _serve,
    "run": _run,
    "backup": _backup,
    "retention": _retention,
    "archive": _archive,
    "dlq": _dlq,
}


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` on uvloop when installed, plain asyncio otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logs.configure(args.log_level.upper())
    try:
        settings = Settings.from_env()
        # uvloop: a faster event loop for every command (gRPC's asyncio client and
        # asyncpg both run on it); plain asyncio where it is not installed.
        return run_async(COMMANDS[args.command](args, settings))
    except WorkerError as error:
        log.error(str(error), extra={"error": type(error).__name__})
        return 1
    except ValueError as error:  # configuration
        print(f"utxoiq-worker: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
