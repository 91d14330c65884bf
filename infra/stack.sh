#!/usr/bin/env bash
# The local mlpaint stack, started and stopped with one command each:
#
#   infra/stack.sh up       PostgreSQL (Debian's package, its data in the stack folder), the
#                           Prefect server and an MLflow tracking server both on it (MLflow's
#                           artifacts in local files), the mlpaint-process work pool and a
#                           process worker, the deployments of prefect.yaml, and Prometheus
#                           (Debian's package, its data in the stack folder) scraping the
#                           /metrics of `mlpaint serve`
#   infra/stack.sh down     stop all of it (each service's whole process group)
#   infra/stack.sh status   what is running, and where
#   infra/stack.sh deploy   (re)register the deployments of prefect.yaml and the automations
#                           of infra/automations.py
#   infra/stack.sh worker   start one more process worker (a live worker takes over the runs
#                           of one that died)
#   infra/stack.sh restart SERVICE [SECONDS]
#                           stop one of postgres, prefect-server, mlflow-server,
#                           prefect-worker, prometheus, keep it down SECONDS (default 0), start
#                           it again
#
# Runs whose worker dies are picked up again with nobody watching: flow runs send a heartbeat
# every 30 s; a run silent for MLPAINT_ZOMBIE_SECONDS (90) is marked Crashed and scheduled
# again for any live worker (infra/automations.py).
#
# Training runs wait their turn: every training deployment uses the pool's `training` work
# queue, whose concurrency limit (MLPAINT_TRAINING_SLOTS, default 1) is how many train at
# once; the rest stay queued until a slot is free.
#
# Settings (environment): MLPAINT_STACK_DIR (state, logs, databases; default .mlpaint/stack),
# PREFECT_PORT (4200), MLFLOW_PORT (5000), PG_PORT (5439), PG_BIN (PostgreSQL's programs,
# default the newest /usr/lib/postgresql/*/bin), MLPAINT_BIN (the virtualenv's bin, default
# .venv/bin), PREFECT_WORKER_QUERY_SECONDS (5: how often the worker polls for runs),
# MLPAINT_ZOMBIE_SECONDS (90), MLPAINT_TRAINING_SLOTS (1), PROMETHEUS_PORT (9090),
# MLPAINT_METRICS_TARGETS (the servers Prometheus scrapes, host:port separated by commas;
# default 127.0.0.1:8000, where `make serve` listens), PROMETHEUS_SCRAPE_SECONDS (15),
# PROMETHEUS_BIN (default: prometheus on PATH; `make prometheus` installs Debian's).
#
# PostgreSQL refuses to run as root: as root, the script runs its server as the `postgres`
# user (who must be able to reach the stack folder). It listens on 127.0.0.1 only, with
# trust authentication: a local development stack, not a hardened one.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${MLPAINT_STACK_DIR:-$REPO/.mlpaint/stack}"
BIN="${MLPAINT_BIN:-$REPO/.venv/bin}"
PREFECT_PORT="${PREFECT_PORT:-4200}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
PG_PORT="${PG_PORT:-5439}"
PG_BIN="${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}"
PG_DATA="$STATE/postgres"
PG_USER="mlpaint"
POOL="mlpaint-process"
TRAINING_QUEUE="training"
TRAINING_SLOTS="${MLPAINT_TRAINING_SLOTS:-1}"
PROMETHEUS_PORT="${PROMETHEUS_PORT:-9090}"
PROMETHEUS_BIN="${PROMETHEUS_BIN:-$(command -v prometheus || true)}"
METRICS_TARGETS="${MLPAINT_METRICS_TARGETS:-127.0.0.1:8000}"
SCRAPE_SECONDS="${PROMETHEUS_SCRAPE_SECONDS:-15}"
# The monitor deployment's runs add what this Prometheus counted to their report.
export MLPAINT_PROMETHEUS_URL="${MLPAINT_PROMETHEUS_URL:-http://127.0.0.1:${PROMETHEUS_PORT}}"
export PREFECT_API_URL="http://127.0.0.1:${PREFECT_PORT}/api"
export MLFLOW_TRACKING_URI="http://127.0.0.1:${MLFLOW_PORT}"
export PREFECT_HOME="$STATE/prefect"
export PREFECT_API_DATABASE_CONNECTION_URL="postgresql+asyncpg://${PG_USER}@127.0.0.1:${PG_PORT}/prefect"
MLFLOW_BACKEND="postgresql+psycopg2://${PG_USER}@127.0.0.1:${PG_PORT}/mlflow"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_LOGGING_EXTRA_LOGGERS="${PREFECT_LOGGING_EXTRA_LOGGERS:-mlpaint}"
export PREFECT_WORKER_QUERY_SECONDS="${PREFECT_WORKER_QUERY_SECONDS:-5}"
# Flow runs started by the stack's workers inherit this: Prefect's minimum beat.
export PREFECT_FLOWS_HEARTBEAT_FREQUENCY="${PREFECT_FLOWS_HEARTBEAT_FREQUENCY:-30}"

log() { printf '%s stack: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

running() {  # running NAME: is the service's process group alive?
  local pidfile="$STATE/$1.pid"
  [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

start() {  # start NAME COMMAND...: in its own session, so `down` can end the whole group
  local name="$1"; shift
  if running "$name"; then log "$name already running (pid $(cat "$STATE/$name.pid"))"; return; fi
  setsid "$@" >"$STATE/$name.log" 2>&1 < /dev/null &
  echo $! >"$STATE/$name.pid"
  log "$name started (pid $!, log $STATE/$name.log)"
}

wait_for() {  # wait_for NAME URL SECONDS
  local name="$1" url="$2" deadline=$((SECONDS + $3))
  until curl -fsS -o /dev/null "$url" 2>/dev/null; do
    if ! running "$name"; then log "$name exited; its log:"; tail -n 30 "$STATE/$name.log" >&2; exit 1; fi
    if (( SECONDS > deadline )); then log "$name did not answer $url in $3 s"; exit 1; fi
    sleep 0.5
  done
  log "$name answers at $url"
}

stop() {  # stop NAME: SIGTERM to the process group, SIGKILL after 15 s
  local name="$1" pidfile="$STATE/$1.pid"
  [[ -f "$pidfile" ]] || return 0
  local pgid; pgid="$(cat "$pidfile")"
  if kill -0 "$pgid" 2>/dev/null; then
    kill -TERM -- "-$pgid" 2>/dev/null || true
    for _ in $(seq 30); do kill -0 -- "-$pgid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pgid" 2>/dev/null || true
    log "$name stopped"
  fi
  rm -f "$pidfile"
}

as_db_owner() {  # as_db_owner COMMAND...: PostgreSQL's programs refuse to run as root
  if [[ $EUID -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

postgres_up() {
  if [[ -z "$PG_BIN" || ! -x "$PG_BIN/initdb" ]]; then
    log "PostgreSQL not found (set PG_BIN, or: apt-get install postgresql; make postgres does it)"
    exit 1
  fi
  if [[ ! -f "$PG_DATA/PG_VERSION" ]]; then
    mkdir -p "$PG_DATA"
    [[ $EUID -eq 0 ]] && chown postgres: "$PG_DATA"
    chmod 700 "$PG_DATA"
    if ! as_db_owner test -w "$PG_DATA"; then
      log "the postgres user cannot reach $PG_DATA: every folder above it must be searchable (o+x)"
      exit 1
    fi
    as_db_owner "$PG_BIN/initdb" -D "$PG_DATA" -U "$PG_USER" --auth=trust -E UTF8 >"$STATE/initdb.log"
    log "postgres: cluster created in $PG_DATA"
  fi
  if as_db_owner "$PG_BIN/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1; then
    log "postgres already running"
  else
    as_db_owner "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_DATA/server.log" -w -t 60 \
      -o "-p $PG_PORT -h 127.0.0.1 -k $PG_DATA" start >/dev/null
    log "postgres started on 127.0.0.1:$PG_PORT (log $PG_DATA/server.log)"
  fi
  local db
  for db in prefect mlflow; do
    if ! "$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" -d postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1; then
      "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" "$db"
      log "postgres: database $db created"
    fi
  done
}

postgres_down() {
  [[ -f "$PG_DATA/PG_VERSION" && -n "$PG_BIN" ]] || return 0
  if as_db_owner "$PG_BIN/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1; then
    as_db_owner "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t 60 stop >/dev/null
    log "postgres stopped"
  fi
}

deploy() {
  (cd "$REPO" && "$BIN/prefect" --no-prompt deploy --all)
  "$BIN/python" "$REPO/infra/automations.py"
}

worker() {  # one more process worker, named by the first free number
  local n=2
  while running "prefect-worker-$n"; do n=$((n + 1)); done
  prefect_worker_up "prefect-worker-$n"
}

prefect_server_up() {
  start prefect-server "$BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT"
  wait_for prefect-server "$PREFECT_API_URL/health" 120
}

mlflow_server_up() {
  # mlflow server forks uvicorn workers and job consumers that outlive a SIGTERM to the
  # parent; its own session lets `down` end the whole group.
  start mlflow-server "$BIN/mlflow" server \
    --backend-store-uri "$MLFLOW_BACKEND" \
    --artifacts-destination "$STATE/mlflow/artifacts" \
    --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1
  wait_for mlflow-server "$MLFLOW_TRACKING_URI/health" 120
}

training_queue_up() {  # the training deployments' queue, holding TRAINING_SLOTS at once
  if "$BIN/prefect" work-queue inspect "$TRAINING_QUEUE" --pool "$POOL" >/dev/null 2>&1; then
    "$BIN/prefect" work-queue set-concurrency-limit "$TRAINING_QUEUE" "$TRAINING_SLOTS" \
      --pool "$POOL" >/dev/null
  else
    "$BIN/prefect" work-queue create "$TRAINING_QUEUE" --pool "$POOL" \
      --limit "$TRAINING_SLOTS" >/dev/null
  fi
  log "work queue $TRAINING_QUEUE: $TRAINING_SLOTS training run(s) at a time"
}

prometheus_up() {  # its configuration is written anew from the settings at each start
  if [[ -z "$PROMETHEUS_BIN" || ! -x "$PROMETHEUS_BIN" ]]; then
    log "Prometheus not found (set PROMETHEUS_BIN, or: apt-get install prometheus; make prometheus does it)"
    exit 1
  fi
  mkdir -p "$STATE/prometheus/data"
  local targets
  targets="$(printf '"%s", ' ${METRICS_TARGETS//,/ })"
  cat >"$STATE/prometheus/prometheus.yml" <<YAML
# Written by infra/stack.sh from MLPAINT_METRICS_TARGETS and PROMETHEUS_SCRAPE_SECONDS.
global:
  scrape_interval: ${SCRAPE_SECONDS}s
  evaluation_interval: ${SCRAPE_SECONDS}s
scrape_configs:
  - job_name: mlpaint
    metrics_path: /metrics
    static_configs:
      - targets: [${targets%, }]
YAML
  start prometheus "$PROMETHEUS_BIN" --config.file="$STATE/prometheus/prometheus.yml" \
    --storage.tsdb.path="$STATE/prometheus/data" \
    --web.listen-address="127.0.0.1:$PROMETHEUS_PORT"
  wait_for prometheus "http://127.0.0.1:$PROMETHEUS_PORT/-/ready" 60
}

prefect_worker_up() {  # prefect_worker_up [NAME]: a process worker of the pool
  start "${1:-prefect-worker}" "$BIN/prefect" worker start --pool "$POOL" --type process
}

up() {
  mkdir -p "$STATE/prefect" "$STATE/mlflow/artifacts"
  postgres_up
  prefect_server_up
  "$BIN/prefect" work-pool inspect "$POOL" >/dev/null 2>&1 \
    || "$BIN/prefect" work-pool create "$POOL" --type process >/dev/null
  log "work pool $POOL ready"
  training_queue_up
  mlflow_server_up
  prefect_worker_up
  prometheus_up
  deploy
  status
}

restart() {  # restart SERVICE [SECONDS]: stop one service, keep it down SECONDS (0), start it
  local name="${1:-}" pause="${2:-0}"
  case "$name" in
    postgres) postgres_down; sleep "$pause"; postgres_up ;;
    prefect-server) stop prefect-server; sleep "$pause"; prefect_server_up ;;
    mlflow-server) stop mlflow-server; sleep "$pause"; mlflow_server_up ;;
    prefect-worker) stop prefect-worker; sleep "$pause"; prefect_worker_up ;;
    prometheus) stop prometheus; sleep "$pause"; prometheus_up ;;
    *) echo "usage: $0 restart postgres|prefect-server|mlflow-server|prefect-worker|prometheus [SECONDS]" >&2
       exit 2 ;;
  esac
}

status() {
  if [[ -n "$PG_BIN" ]] && as_db_owner "$PG_BIN/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1; then
    echo "postgres: running on 127.0.0.1:$PG_PORT (databases prefect, mlflow)"
  else
    echo "postgres: stopped"
  fi
  for name in prefect-server mlflow-server prefect-worker $(extra_workers) prometheus; do
    if running "$name"; then echo "$name: running (pid $(cat "$STATE/$name.pid"))"; else echo "$name: stopped"; fi
  done
  echo "Prefect UI:  http://127.0.0.1:${PREFECT_PORT}"
  echo "MLflow UI:   $MLFLOW_TRACKING_URI"
  echo "Prometheus:  http://127.0.0.1:${PROMETHEUS_PORT} (scraping ${METRICS_TARGETS})"
}

extra_workers() {  # the names of the workers `worker` started
  local pidfile
  for pidfile in "$STATE"/prefect-worker-*.pid; do
    [[ -e "$pidfile" ]] && basename "$pidfile" .pid
  done
  return 0
}

down() {
  for name in prometheus $(extra_workers) prefect-worker mlflow-server prefect-server; do stop "$name"; done
  postgres_down
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  deploy) deploy ;;
  worker) worker ;;
  restart) shift; restart "$@" ;;
  *) echo "usage: $0 up|down|status|deploy|worker|restart SERVICE [SECONDS]" >&2; exit 2 ;;
esac
