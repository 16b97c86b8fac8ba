"""utxoIQ persistence worker: the runtime (config, database, sources, CLI)."""

import os

# gRPC's fork handlers run in every child a worker forks (pg_dump, pg_restore) while
# gRPC threads are busy, and then may crash the child before it execs (seen: pg_dump
# "killed by signal 11"). The worker never forks Python, so they have nothing to do:
# off, before anything imports grpc (it reads the variable when it is imported).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
