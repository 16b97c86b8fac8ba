"""Fault tests: the worker killed, its database, cache and network broken under it.

Throwaway PostgreSQL and Redis of the suite's own (``postgres.py``, ``redis_server.py``),
a pausable TCP proxy (``proxy.py``) and worker subprocesses (``processes.py``); the
fixtures are in ``conftest.py``.
"""
