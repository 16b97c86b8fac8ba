"""What the HTTP app's routes use, over one ``Runtime``."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import FastAPI, Request
from sqlalchemy.ext.asyncio import AsyncEngine

from worker.config import Settings
from worker.pipeline.crash_points import CrashPoints
from worker.pipeline.settings import BatchSettings
from worker.read.cached import CacheService
from worker.read.service import DatabaseService
from worker.runtime import Runtime
from worker.sources.push import PushIngest
from worker.storage.cache import Cache
from worker.telemetry import Telemetry
from worker.topics import Registry


@dataclass
class Services:
    """The runtime, the data service and cache-aside reads over it, the push intake."""

    runtime: Runtime
    db: DatabaseService
    reads: CacheService
    push: PushIngest

    @classmethod
    def over(cls, runtime: Runtime) -> Services:
        db = DatabaseService(runtime.engine, runtime.invalidations)
        return cls(runtime, db, CacheService(runtime.cache, db), PushIngest(runtime))

    @classmethod
    def create(
        cls,
        settings: Settings,
        registry: Registry,
        batch: BatchSettings | None = None,
        telemetry: Telemetry | None = None,
        crash_points: CrashPoints | None = None,
    ) -> Services:
        runtime = Runtime(
            settings, registry, telemetry=telemetry, crash_points=crash_points, batch=batch
        )
        return cls.over(runtime)

    @property
    def engine(self) -> AsyncEngine:
        return self.runtime.engine

    @property
    def cache(self) -> Cache:
        return self.runtime.cache

    async def close(self) -> None:
        await self.runtime.close()


def services_of(app: FastAPI) -> Services:
    services: Services = app.state.services
    return services


def services(request: Request) -> Services:
    """The running app's services (a route's view of ``app.state``)."""
    return services_of(request.app)
