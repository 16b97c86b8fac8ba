"""``utxoiq-worker``: the one entry point (also ``python -m worker``)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from worker import logs
from worker.config import Settings
from worker.exceptions import WorkerError

log = logging.getLogger(__name__)


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
    return parser


async def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "migrate":
        from worker.migrate import upgrade

        await upgrade(settings, args.revision)
        return 0
    if args.command == "downgrade":
        from worker.migrate import downgrade

        await downgrade(settings, args.revision)
        return 0
    if args.command == "demo":
        from worker.demo import run_demo

        return await run_demo(settings)
    raise AssertionError(f"unknown command {args.command}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logs.configure(args.log_level.upper())
    try:
        settings = Settings.from_env()
        return asyncio.run(_dispatch(args, settings))
    except WorkerError as error:
        log.error(str(error), extra={"error": type(error).__name__})
        return 1
    except ValueError as error:  # configuration
        print(f"utxoiq-worker: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
