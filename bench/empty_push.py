"""The push ceiling, a baseline of scenario ``push``: ``serve``'s server doing no work.

``python -m bench.empty_push [--processes N]`` serves on ``PORT`` exactly as
``utxoiq-worker serve`` does (the same supervisor and processes, uvicorn with
httptools and the same head limits) an app that reads each request's body and
answers 204: no envelope decoding, no validation, no database. What ``serve`` reaches
against it is the share of the server's capacity that the push work leaves.
"""

from __future__ import annotations

import argparse
import os
import socket

from starlette.types import Receive, Scope, Send

from worker.cli.main import run_async
from worker.http.serve import AnnouncingServer, server_config
from worker.supervisor import add_process_options, run_on_cores


async def empty_app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})


async def serve_one(sock: socket.socket, ready_fd: int | None) -> int:
    host, port = sock.getsockname()[:2]
    server = AnnouncingServer(server_config(empty_app, port, host), sock, ready_fd)
    await server.serve(sockets=[sock])
    return 0


async def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.empty_push")
    add_process_options(parser)
    args = parser.parse_args()
    port = int(os.environ.get("PORT", "8080"))
    return await run_on_cores(args, "127.0.0.1", port, serve_one, module="bench.empty_push")


if __name__ == "__main__":
    raise SystemExit(run_async(main()))
