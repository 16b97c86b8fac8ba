"""A metric sample's identity: its ``event_id``, or the UUIDv5 of its canonical JSON.

So a republished sample is the same sample, whoever built it: the message path
(``handlers.metrics.message_rows``) and the service API (``sample_identity``) give
equal samples equal identities.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime

import orjson

from schemas.metrics import MetricSample, canonical_metadata
from worker.storage.database import uuid_from_bytes

# Fixed forever: changing it would give every republished sample a new identity.
IDENTITY_NAMESPACE = uuid.UUID("4c0b6a58-5d8e-4f6b-9a1e-2b7f0c3d9e10")
_NAMESPACE_BYTES = IDENTITY_NAMESPACE.bytes
# RFC 4122's version (5) and variant (10) bits, set on the first 128 bits of the SHA-1.
_VERSION_CLEAR = ~((0xF000 << 64) | (0xC000 << 48)) & ((1 << 128) - 1)
_VERSION_5 = (0x5000 << 64) | (0x8000 << 48)


def sample_identity(sample: MetricSample) -> uuid.UUID:
    """``event_id``, or the UUIDv5 of the sample's canonical JSON."""
    if sample.event_id is not None:
        return sample.event_id
    metadata = None if sample.metadata is None else canonical_metadata(sample.metadata)
    return derived_identity(
        sample.service_name,
        sample.metric_type,
        sample.metric_value,
        sample.unit,
        None if sample.timestamp is None else sample.timestamp.astimezone(UTC),
        metadata,
    )


def derived_identity(
    service_name: str,
    metric_type: str,
    metric_value: float,
    unit: str,
    utc_timestamp: datetime | None,
    metadata: str | None,
) -> uuid.UUID:
    """The UUIDv5 of a sample's canonical JSON: a fixed-order array of its fields.

    ``[service_name, metric_type, metric_value, unit, timestamp in UTC or null,
    metadata with sorted keys or null]``, compact. Equal samples give equal text
    however their JSON was laid out, and an array needs no key sorting. The caller
    gives the timestamp in UTC (``datetime.UTC``), the metadata as canonical text.
    """
    # The metadata is canonical JSON already: spliced in as is.
    canonical = orjson.dumps(
        [
            service_name,
            metric_type,
            metric_value,
            unit,
            utc_timestamp,
            None if metadata is None else orjson.Fragment(metadata),
        ]
    )
    # uuid.uuid5 itself, without its per-call namespace.bytes and str round trip.
    # Every sample without an event_id pays this, hence uuid_from_bytes rather than
    # uuid.UUID's constructor (see there).
    digest = hashlib.sha1(_NAMESPACE_BYTES + canonical).digest()
    bits = int.from_bytes(digest[:16]) & _VERSION_CLEAR | _VERSION_5
    return uuid_from_bytes(bits.to_bytes(16))
