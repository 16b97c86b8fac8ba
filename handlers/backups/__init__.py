"""Backups, the ``backup`` task of the ``maintenance`` topic (CONTRACT.md, Backups).

``catalog``: object names and what the store holds; ``take``: pg_dump streamed to
the store; ``verify``: read back, hash, restore into a scratch database, count;
``prune``: what retention deletes; ``restore``: an operator's restore; ``task``: the
scheduled run (take, verify, manifest, prune) that the handler and the CLI share.
"""
