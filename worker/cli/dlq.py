"""``utxoiq-worker dlq stats|list|export|replay|purge``: dead letters for an operator.

A thin shell over ``worker.dlq.operations.DeadLetters``: parse, call, print. Tables on
a terminal (``--json``: JSON lines); progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from worker.config import Settings
from worker.dlq.letters import MAX_REPLAYS, DeadLetter, Selection
from worker.pipeline.crash_points import CrashPoints
from worker.progress import Progress
from worker.topics import Registry

if TYPE_CHECKING:  # loaded by the command only: it brings the Pub/Sub client
    from worker.dlq.operations import DeadLetters, TopicStats

LISTED_NOTE = (
    "listing consumes nothing: the leases were released at once, so a listed message"
    " may be redelivered to another reader of the subscription meanwhile"
)


def _moment(text: str) -> datetime:
    """An RFC 3339 time, or an age back from now: ``30m``, ``6h``, ``2d``."""
    units = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
    if text[-1:] in units and text[:-1].isdigit():
        return datetime.now(UTC) - timedelta(**{units[text[-1]]: int(text[:-1])})
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: an RFC 3339 time or an age (30m, 6h, 2d)"
        ) from None
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r}: give an offset (Z or +hh:mm)")
    return moment


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dlq = commands.add_parser("dlq", help="inspect, export, replay and purge dead letters")
    verbs = dlq.add_subparsers(dest="action", required=True)

    stats = verbs.add_parser("stats", help="dead letters by reason, oldest and newest")
    stats.add_argument("topic", nargs="?", help="one topic (default: every topic)")
    stats.add_argument("--json", action="store_true", help="JSON lines")

    listing = verbs.add_parser("list", help="dead letters of a topic (consumes nothing)")
    listing.add_argument("topic")
    _filters(listing)
    listing.add_argument("--limit", type=int, default=100, help="at most N (default 100)")
    listing.add_argument("--json", action="store_true", help="JSON lines, data in full")

    export = verbs.add_parser("export", help="dead letters to a JSON lines file (acks none)")
    export.add_argument("topic")
    export.add_argument("--out", required=True, type=Path, metavar="FILE")
    export.add_argument("--reason")

    replay = verbs.add_parser("replay", help="publish dead letters to their topic again")
    replay.add_argument("topic")
    _filters(replay, since=False)
    replay.add_argument("--message-id", action="append", dest="message_ids", metavar="ID")
    replay.add_argument("--from-file", type=Path, metavar="FILE", help="an edited export")
    replay.add_argument("--dry-run", action="store_true", help="count, publish nothing")
    replay.add_argument("--rate", type=float, metavar="N", help="at most N messages a second")
    replay.add_argument(
        "--force", action="store_true", help=f"replay past {MAX_REPLAYS} replays as well"
    )

    purge = verbs.add_parser("purge", help="acknowledge dead letters (delete them)")
    purge.add_argument("topic")
    purge.add_argument("--reason")
    purge.add_argument("--before", type=_moment, metavar="T", help="dead-lettered before T")
    purge.add_argument("--yes", action="store_true", help="yes, delete them")


def _filters(parser: argparse.ArgumentParser, since: bool = True) -> None:
    parser.add_argument("--reason", help="only this reason")
    if since:
        parser.add_argument(
            "--since", type=_moment, metavar="T", help="dead-lettered at T or later (or 6h)"
        )


async def command(args: argparse.Namespace, settings: Settings, registry: Registry) -> int:
    from worker.dlq.operations import DeadLetters
    from worker.pubsub.client import PubSub

    pubsub = PubSub(settings)
    try:
        letters = DeadLetters(pubsub, registry, CrashPoints.from_env(), settings.dlq_lease_s)
        return await ACTIONS[args.action](letters, args)
    finally:
        await pubsub.close()


async def _stats(letters: DeadLetters, args: argparse.Namespace) -> int:
    stats = await letters.stats([args.topic] if args.topic else None)
    if args.json:
        for topic in stats:
            print(json.dumps(_stats_line(topic)))
        return 0
    print(f"{'topic':<20} {'reason':<28} {'count':>7}  {'oldest':>8}  {'newest':>8}")
    for topic in stats:
        if not topic.total:
            print(f"{topic.topic:<20} {'(empty)':<28} {0:>7}")
        for reason, count in topic.by_reason.items():
            print(
                f"{topic.topic:<20} {reason:<28} {count:>7,}"
                f"  {_age(topic.oldest_age_s):>8}  {_age(topic.newest_age_s):>8}"
            )
    return 0


def _stats_line(topic: TopicStats) -> dict[str, object]:
    return {
        "topic": topic.topic,
        "total": topic.total,
        "by_reason": topic.by_reason,
        "oldest_age_s": topic.oldest_age_s,
        "newest_age_s": topic.newest_age_s,
    }


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


async def _list(letters: DeadLetters, args: argparse.Namespace) -> int:
    selection = Selection(reason=args.reason, since=args.since)
    listed = await letters.list(args.topic, selection, args.limit)
    now = datetime.now(UTC)
    if args.json:
        for letter in listed:
            print(json.dumps({**letter.exported(), "detail": letter.detail}, ensure_ascii=False))
    else:
        print(f"{'message id':<18} {'reason':<26} {'age':>7}  {'source id':<18} detail / data")
        for letter in listed:
            print(_row(letter, now))
    print(f"{len(listed)} listed; {LISTED_NOTE}", file=sys.stderr)
    return 0


def _row(letter: DeadLetter, now: datetime) -> str:
    return (
        f"{letter.message_id:<18} {letter.reason:<26} {_age(letter.age_s(now)):>7}"
        f"  {letter.source_message_id:<18} {letter.detail[:70]}\n"
        f"{'':<74}{letter.preview()}"
    )


async def _export(letters: DeadLetters, args: argparse.Namespace) -> int:
    with args.out.open("w", encoding="utf-8") as out:
        count = await letters.export(args.topic, out, Selection(reason=args.reason))
    print(f"{count} dead letters of {args.topic} written to {args.out} (none acknowledged)")
    return 0


async def _replay(letters: DeadLetters, args: argparse.Namespace) -> int:
    ids = frozenset(args.message_ids) if args.message_ids else None
    progress = Progress(f"replay {args.topic}", unit="messages")
    summary = await letters.replay(
        args.topic,
        Selection(reason=args.reason, message_ids=ids),
        from_file=args.from_file,
        dry_run=args.dry_run,
        rate_per_s=args.rate,
        force=args.force,
        progress=progress,
    )
    if summary.replayed and not args.dry_run:
        progress.finish()
    verb = "would be replayed" if args.dry_run else "replayed"
    print(
        f"{args.topic}: {summary.replayed} {verb}, {summary.skipped} skipped"
        f" (replayed {MAX_REPLAYS} times already: --force), {summary.failed} failed"
    )
    for error in summary.errors[:5]:
        print(f"  {error}", file=sys.stderr)
    return 1 if summary.failed else 0


async def _purge(letters: DeadLetters, args: argparse.Namespace) -> int:
    if not args.yes:
        print("dlq purge deletes dead letters for good: add --yes", file=sys.stderr)
        return 2
    purged = await letters.purge(args.topic, Selection(reason=args.reason, before=args.before))
    if purged is None:
        print(f"{args.topic}: every dead letter purged (the subscription was sought to now)")
    else:
        print(f"{args.topic}: {purged} dead letters purged")
    return 0


ACTIONS = {
    "stats": _stats,
    "list": _list,
    "export": _export,
    "replay": _replay,
    "purge": _purge,
}
