"""One module per topic: validate, write a batch in one statement, name the cache keys.

Each module declares its topic (``TOPIC``, a ``worker.topics.Topic``); ``registry()``
collects them, so adding a topic is adding a module here (and its migration).
"""

from __future__ import annotations

import importlib
import pkgutil

from worker.topics import Registry, Topic


def registry() -> Registry:
    """Every topic declared by a module of this package, in module order."""
    topics: list[Topic] = []
    for module in pkgutil.iter_modules(__path__):
        declared = getattr(importlib.import_module(f"{__name__}.{module.name}"), "TOPIC", None)
        if isinstance(declared, Topic):
            topics.append(declared)
    return Registry(topics)
