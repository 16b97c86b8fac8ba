# The worker image: the pull worker (`run`) or the Cloud Run service (`serve`).
FROM python:3.11-slim AS build
RUN pip install --no-cache-dir uv
WORKDIR /app
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --locked --no-dev --no-install-project --compile-bytecode
COPY worker ./worker
COPY handlers ./handlers
COPY schemas ./schemas
COPY alembic ./alembic
COPY alembic.ini ./
RUN uv sync --locked --no-dev --compile-bytecode

FROM python:3.11-slim
# pg_dump for the backup task; the client's major version must match the server's.
RUN apt-get update && apt-get install -y --no-install-recommends postgresql-client \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 10001 worker
WORKDIR /app
COPY --from=build --chown=worker /app /app
USER worker
ENV PATH="/app/.venv/bin:$PATH" PYTHONUNBUFFERED=1
ENTRYPOINT ["utxoiq-worker"]
CMD ["run"]
