# The worker image: the pull worker (`run`) or the Cloud Run service (`serve`).
# Debian 12 (bookworm), pinned: its postgresql-client is 15, and pg_dump must be at
# least the server's major version (README: supported PostgreSQL servers).
FROM python:3.11-slim-bookworm AS build
RUN pip install --no-cache-dir uv==0.13.9
WORKDIR /app
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --locked --no-dev --no-install-project --compile-bytecode
COPY worker ./worker
COPY handlers ./handlers
COPY schemas ./schemas
COPY alembic ./alembic
COPY alembic.ini ./
RUN uv sync --locked --no-dev --compile-bytecode

FROM python:3.11-slim-bookworm
# pg_dump and pg_restore 15 for backups: they dump and restore servers up to 15. The
# package is pinned by its name (major 15) and the Debian release above, not by its
# exact version: Debian replaces a point release with its security fix, and a pinned
# one would no longer install.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends postgresql-client-15 \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 10001 worker
WORKDIR /app
COPY --from=build --chown=worker /app /app
USER 10001
ENV PATH="/app/.venv/bin:$PATH" PYTHONUNBUFFERED=1
ENTRYPOINT ["utxoiq-worker"]
CMD ["run"]
