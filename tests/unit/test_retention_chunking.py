"""Cutting one stream of archive lines into chunks, whatever slices COPY delivers."""

from __future__ import annotations

import asyncio
import gzip
import itertools
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from unittest import mock

from hypothesis import given, settings
from hypothesis import strategies as st

from handlers.retention import archive, chunking
from handlers.retention.chunking import Chunk, ChunkSplitter, _after_line
from handlers.retention.sweep import Sweep
from worker.pipeline.crash_points import CrashPoints
from worker.storage.object_files import FileStore

START = datetime(2026, 1, 1, tzinfo=UTC)


def _line(n: int, row_id: uuid.UUID) -> bytes:
    """A line as ``METRICS.line_sql`` writes it (json_build_object's spacing)."""
    at = (START + timedelta(seconds=n)).isoformat()
    return f'{{"id" : "{row_id}", "timestamp" : "{at}", "unit" : "x"}}\n'.encode()


def _reference_after_line(data: bytes, start: int, count: int) -> int:
    at = start - 1
    for _ in range(count):
        at = data.index(b"\n", at + 1)
    return at + 1


@given(
    st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), min_size=1),
    st.data(),
)
def test_after_line_finds_the_nth_newline_from_any_start(
    lines: list[bytes], data: st.DataObject
) -> None:
    stream = b"".join(line + b"\n" for line in lines) + data.draw(st.sampled_from([b"", b"tail"]))
    start_line = data.draw(st.integers(0, len(lines) - 1))
    start = _reference_after_line(stream, 0, start_line)
    end = stream.rfind(b"\n") + 1
    held = len(lines) - start_line
    count = data.draw(st.integers(1, held))
    assert _after_line(stream, start, end, count, held) == _reference_after_line(
        stream, start, count
    )


Settled = tuple[str, int, str, list[str] | None, bytes]


def _chunks(tmp: Path, lines: list[bytes], cuts: list[int], chunk_rows: int) -> list[Settled]:
    """Feed ``lines`` cut at ``cuts`` (offsets into their stream); what was settled."""
    stream = b"".join(lines)
    settled: list[tuple[archive.Exported, Chunk]] = []

    async def keep(exported: archive.Exported, chunk: Chunk) -> None:
        settled.append((exported, chunk))

    async def notes(_objects: list[dict[str, object]]) -> None:
        pass

    async def run() -> None:
        store = FileStore(tmp)
        sweep = Sweep(store, "test run", notes, CrashPoints.disarmed(), chunk_rows=chunk_rows)
        splitter = ChunkSplitter(sweep, keep, keep_ids=True)
        edges = [0, *sorted(set(cuts)), len(stream)]
        for begin, end in itertools.pairwise(edges):
            await splitter.feed(stream[begin:end])
        await splitter.close()
        store.close()

    asyncio.run(run())
    return [
        (
            e.key,
            e.manifest.rows,
            e.manifest.sha256,
            c.ids,
            gzip.decompress((tmp / e.key).read_bytes()),
        )
        for e, c in sorted(settled, key=lambda s: s[0].key)
    ]


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 60), st.integers(1, 9), st.lists(st.integers(0, 10_000), max_size=20))
def test_chunks_do_not_depend_on_how_the_stream_is_sliced(
    tmp_path_factory: object, rows: int, chunk_rows: int, cuts: list[int]
) -> None:
    """Same objects, same bytes, same ids: a rerun names the same objects. (Blocks of
    100 bytes given to the compressor, so that a chunk spans several.)"""
    ids = [uuid.uuid4() for _ in range(rows)]
    lines = [_line(n, i) for n, i in enumerate(ids)]
    size = len(b"".join(lines))
    root = Path(tmp_path_factory.mktemp("chunks"))  # type: ignore[attr-defined]
    with mock.patch.object(chunking, "COMPRESS_BLOCK", 100):
        sliced = _chunks(root / "sliced", lines, [c % (size + 1) for c in cuts], chunk_rows)
        whole = _chunks(root / "whole", lines, [], chunk_rows)
    assert sliced == whole
    assert [rows_ for _, rows_, *_ in whole] == [
        min(chunk_rows, rows - n) for n in range(0, rows, chunk_rows)
    ]
    assert b"".join(text for *_, text in whole) == b"".join(lines)
    assert [i for *_, chunk_ids, _ in whole for i in chunk_ids or ()] == [str(i) for i in ids]
