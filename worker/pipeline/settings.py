"""How a topic's pipeline batches: declared with the topic, read by the runtime.

Apart from ``batching`` so that declaring a topic (and every command that only reads
the declarations) does not load the Pub/Sub client.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchSettings:
    max_batch_size: int = 2000
    max_batch_bytes: int = 4 * 1024 * 1024
    max_batch_delay_ms: int = 50
    max_concurrent_flushes: int = 3
    flush_when_idle: bool = True
