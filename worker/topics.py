"""The topic registry: every topic the worker knows, each declared once.

A handler module declares its topic as a module-level ``TOPIC = Topic(...)``: its
name, its worker subscription, how its handler is built, its batch settings, whether
its commits invalidate caches, and a start-up hook. The Pub/Sub topology, ``run``,
``serve`` and its push routes, and ``deploy/`` all read the registry; none of them
names a topic. ``handlers.registry()`` collects the declarations of the ``handlers``
package (adding a topic is one module there, and its migration).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy.ext.asyncio import AsyncEngine

from worker.config import Settings
from worker.pipeline.crash_points import CrashPoints
from worker.pipeline.handler import Handler
from worker.pipeline.settings import BatchSettings
from worker.pubsub import names

if TYPE_CHECKING:
    from worker.storage.cache import Cache
    from worker.telemetry import Telemetry


class HandlerContext(Protocol):
    """What building a handler may use (the runtime gives it)."""

    @property
    def settings(self) -> Settings: ...

    @property
    def cache(self) -> Cache: ...

    @property
    def crash_points(self) -> CrashPoints: ...

    @property
    def telemetry(self) -> Telemetry: ...


StartHook = Callable[[AsyncEngine], Awaitable[None]]
"""Run before a process consumes the topic, and by ``migrate`` (e.g. partitions ahead)."""


@dataclass(frozen=True)
class Topic:
    """One topic: where its messages come from and what applies them."""

    name: str
    subscription: str
    build_handler: Callable[[HandlerContext], Handler[Any]]
    batch: BatchSettings = field(default_factory=BatchSettings)
    # Committed batches name the cache keys they touched on ``cache-invalidation``.
    invalidates_cache: bool = True
    # Consumed by ``utxoiq-worker run`` when no ``--only`` is given.
    pulled_by_default: bool = True
    on_start: StartHook | None = None

    @property
    def dead_letter_topic(self) -> str:
        return names.dead_letter_topic(self.name)

    @property
    def dead_letter_subscription(self) -> str:
        return names.dead_letter_subscription(self.name)


class Registry:
    """An ordered set of topics, by name."""

    def __init__(self, topics: Iterable[Topic]) -> None:
        self._topics = {t.name: t for t in topics}
        subscriptions = [t.subscription for t in self._topics.values()]
        if len(set(subscriptions)) != len(subscriptions):
            raise ValueError(f"two topics share a subscription: {subscriptions}")

    def __iter__(self) -> Iterator[Topic]:
        return iter(self._topics.values())

    def __len__(self) -> int:
        return len(self._topics)

    def __contains__(self, name: object) -> bool:
        return name in self._topics

    def __getitem__(self, name: str) -> Topic:
        try:
            return self._topics[name]
        except KeyError:
            known = ", ".join(self._topics)
            raise ValueError(f"unknown topic {name!r}; known: {known}") from None

    def names(self) -> tuple[str, ...]:
        return tuple(self._topics)

    def pulled_by_default(self) -> tuple[str, ...]:
        return tuple(t.name for t in self if t.pulled_by_default)

    def with_topic(self, topic: Topic) -> Registry:
        """This registry and ``topic`` (tests, a plug-in's extra topic)."""
        return Registry([*self, topic])
