"""Pub/Sub over one gRPC channel, with raw protobuf stubs on the hot path.

The GAPIC clients wrap every message in proto-plus objects, which costs more CPU
than the rest of the worker's per-message work; measured against the emulator, raw
stubs pull several times faster on the same channel. The channel itself comes from
the GAPIC transport (credentials, scopes, endpoint, keepalive) or, when
``PUBSUB_EMULATOR_HOST`` is set, is an insecure channel to the emulator.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from google.protobuf import empty_pb2
from google.pubsub_v1.services.subscriber.transports.grpc_asyncio import (
    SubscriberGrpcAsyncIOTransport,
)
from google.pubsub_v1.types import pubsub as types

from worker.config import Settings
from worker.exceptions import PubSubError

log = logging.getLogger(__name__)

PubsubMessage: Any = types.PubsubMessage.pb()
ReceivedMessage: Any = types.ReceivedMessage.pb()
PullRequest: Any = types.PullRequest.pb()
PullResponse: Any = types.PullResponse.pb()
StreamingPullRequest: Any = types.StreamingPullRequest.pb()
StreamingPullResponse: Any = types.StreamingPullResponse.pb()
AcknowledgeRequest: Any = types.AcknowledgeRequest.pb()
ModifyAckDeadlineRequest: Any = types.ModifyAckDeadlineRequest.pb()
PublishRequest: Any = types.PublishRequest.pb()
PublishResponse: Any = types.PublishResponse.pb()
GetTopicRequest: Any = types.GetTopicRequest.pb()
SeekRequest: Any = types.SeekRequest.pb()
SeekResponse: Any = types.SeekResponse.pb()
Topic: Any = types.Topic.pb()

SCOPES = ("https://www.googleapis.com/auth/pubsub",)
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.keepalive_time_ms", 30_000),
]
# Acknowledge and ModifyAckDeadline requests stay well under the 512 KB request cap.
MAX_ACK_IDS_PER_REQUEST = 1000
TRANSIENT_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
}


def topic_path(project: str, topic: str) -> str:
    return f"projects/{project}/topics/{topic}"


def subscription_path(project: str, subscription: str) -> str:
    return f"projects/{project}/subscriptions/{subscription}"


def open_channel(settings: Settings) -> grpc.aio.Channel:
    if settings.pubsub_emulator_host:
        return grpc.aio.insecure_channel(settings.pubsub_emulator_host, options=CHANNEL_OPTIONS)
    channel: grpc.aio.Channel = SubscriberGrpcAsyncIOTransport.create_channel(
        host="pubsub.googleapis.com", scopes=SCOPES, options=CHANNEL_OPTIONS
    )
    return channel


def _chunks(items: Sequence[str], size: int) -> list[Sequence[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class PubSub:
    """The data-plane calls the worker makes, errors as ``PubSubError``."""

    def __init__(self, settings: Settings, channel: grpc.aio.Channel | None = None) -> None:
        self.project = settings.google_cloud_project
        self.channel = channel or open_channel(settings)
        sub, pub = "/google.pubsub.v1.Subscriber/", "/google.pubsub.v1.Publisher/"
        empty = empty_pb2.Empty.FromString
        self._pull = self.channel.unary_unary(
            sub + "Pull", PullRequest.SerializeToString, PullResponse.FromString
        )
        self._streaming_pull = self.channel.stream_stream(
            sub + "StreamingPull",
            StreamingPullRequest.SerializeToString,
            StreamingPullResponse.FromString,
        )
        self._ack = self.channel.unary_unary(
            sub + "Acknowledge", AcknowledgeRequest.SerializeToString, empty
        )
        self._modack = self.channel.unary_unary(
            sub + "ModifyAckDeadline", ModifyAckDeadlineRequest.SerializeToString, empty
        )
        self._seek = self.channel.unary_unary(
            sub + "Seek", SeekRequest.SerializeToString, SeekResponse.FromString
        )
        self._get_topic = self.channel.unary_unary(
            pub + "GetTopic", GetTopicRequest.SerializeToString, Topic.FromString
        )
        self._publish = self.channel.unary_unary(
            pub + "Publish", PublishRequest.SerializeToString, PublishResponse.FromString
        )

    async def reachable(self, topic: str, timeout_s: float = 2.0) -> bool:
        """Whether Pub/Sub answers (a GetTopic on one of our topics)."""
        try:
            await self._get_topic(GetTopicRequest(topic=self.topic(topic)), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return False
        return True

    async def close(self) -> None:
        await self.channel.close()

    def topic(self, name: str) -> str:
        return topic_path(self.project, name)

    def subscription(self, name: str) -> str:
        return subscription_path(self.project, name)

    async def pull(self, subscription: str, max_messages: int, timeout_s: float) -> list[Any]:
        """Up to ``max_messages`` messages; an empty list when none came in time."""
        request = PullRequest(subscription=subscription, max_messages=max_messages)
        try:
            response = await self._pull(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return []
            raise _translate(error, "pull") from error
        return list(response.received_messages)

    def streaming_pull(self, requests: AsyncIterator[Any]) -> Any:
        """The raw bidirectional StreamingPull call (see worker.sources.pull)."""
        return self._streaming_pull(requests)

    async def acknowledge(self, subscription: str, ack_ids: Sequence[str]) -> None:
        for chunk in _chunks(ack_ids, MAX_ACK_IDS_PER_REQUEST):
            try:
                await self._ack(
                    AcknowledgeRequest(subscription=subscription, ack_ids=chunk), timeout=30
                )
            except grpc.aio.AioRpcError as error:
                raise _translate(error, "acknowledge") from error

    async def modify_ack_deadline(
        self, subscription: str, ack_ids: Sequence[str], deadline_s: int
    ) -> None:
        """Extend leases, or with ``deadline_s=0`` nack: redeliver as soon as possible."""
        for chunk in _chunks(ack_ids, MAX_ACK_IDS_PER_REQUEST):
            request = ModifyAckDeadlineRequest(
                subscription=subscription, ack_ids=chunk, ack_deadline_seconds=deadline_s
            )
            try:
                await self._modack(request, timeout=30)
            except grpc.aio.AioRpcError as error:
                raise _translate(error, "modify_ack_deadline") from error

    async def seek(self, subscription: str, time: Any) -> None:
        """Seek ``subscription`` to ``time`` (a protobuf Timestamp): every message
        published before it counts as acknowledged (a purge, when ``time`` is now)."""
        try:
            await self._seek(SeekRequest(subscription=subscription, time=time), timeout=60)
        except grpc.aio.AioRpcError as error:
            raise _translate(error, "seek") from error

    async def publish(
        self, topic: str, messages: Sequence[Any], timeout_s: float = 30
    ) -> list[str]:
        """Publish raw ``PubsubMessage`` protobufs in one request; their message ids."""
        try:
            response = await self._publish(
                PublishRequest(topic=topic, messages=messages), timeout=timeout_s
            )
        except grpc.aio.AioRpcError as error:
            raise _translate(error, f"publish to {topic}") from error
        return list(response.message_ids)


def _translate(error: grpc.aio.AioRpcError, call: str) -> PubSubError:
    code = error.code()
    kind = "transient" if code in TRANSIENT_CODES else "failed"
    return PubSubError(f"Pub/Sub {call} {kind}: {code.name}: {error.details()}")
