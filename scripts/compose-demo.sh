#!/usr/bin/env bash
# The 3-site FFE demo across the docker-compose stack: three hospitals in containers.
#
#   scripts/compose-demo.sh [options]
#
#   --install            install Debian's docker.io + docker-compose if no engine (root; asks
#                        first unless --yes)
#   --yes                answer yes to the install question
#   --rounds N           federated rounds (default 5, as `fednnunet demo`)
#   --restart SERVICE    `restart` SERVICE (e.g. site-902, coordinator) once round 2 is
#                        running; may be given twice. Reports time lost.
#   --keep               leave the stack up at the end (default: `down -v`)
#   --down               only take a stack down (containers, networks, volumes) and stop
#                        an engine this script started; images stay as build cache
#   --purge-images       with --down: also remove the fednnunet/* and base images
#
# Steps: engine (started if not running), deploy/generate.py (first init draws the
# secrets), deploy/docker/build.sh (cached after the first run), `up -d`, wait until
# healthy, `run --rm client fednnunet experiment start /specs/demo.yml --watch`, per-site
# Dice, `down -v`. Environment: COMPOSE_PROJECT_NAME (default from deploy/.env).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEPLOY="$REPO/deploy"
STATE_DIR="${FEDNNUNET_DOCKER_STATE:-$REPO/.compose-demo}"
INSTALL=0 YES=0 KEEP=0 ONLY_DOWN=0 PURGE=0 ROUNDS=5
RESTARTS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --install) INSTALL=1 ;;
    --yes) YES=1 ;;
    --keep) KEEP=1 ;;
    --down) ONLY_DOWN=1 ;;
    --purge-images) PURGE=1 ;;
    --rounds) ROUNDS="$2"; shift ;;
    --restart) RESTARTS+=("$2"); shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

log() { printf '[demo %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'; }
PY="$REPO/.venv/bin/python"; [[ -x "$PY" ]] || PY="$(command -v python3)"
mkdir -p "$STATE_DIR"

# ------------------------------------------------------------------ engine
ensure_engine() {
  docker info >/dev/null 2>&1 && return 0
  if ! command -v dockerd >/dev/null; then
    if [[ $INSTALL -eq 0 ]]; then
      log "no Docker engine: rerun with --install (installs Debian's docker.io + docker-compose)"
      exit 1
    fi
    if [[ $YES -eq 0 ]]; then
      read -r -p "install docker.io docker-compose with apt-get? [y/N] " answer
      [[ "$answer" == [yY]* ]] || exit 1
    fi
    [[ $EUID -eq 0 ]] || { log "installing needs root"; exit 1; }
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io docker-compose debootstrap
  fi
  [[ $EUID -eq 0 ]] || { log "dockerd is not running and starting it needs root"; exit 1; }
  log "starting dockerd (overlay2)"
  dockerd --storage-driver overlay2 >"$STATE_DIR/dockerd.log" 2>&1 &
  echo $! >"$STATE_DIR/dockerd.pid"
  local i
  for i in $(seq 1 60); do docker info >/dev/null 2>&1 && return 0; sleep 0.5; done
  log "dockerd did not start; see $STATE_DIR/dockerd.log"; exit 1
}

stop_engine_if_ours() {
  local pid
  [[ -f "$STATE_DIR/dockerd.pid" ]] || return 0
  pid="$(cat "$STATE_DIR/dockerd.pid")"
  if kill -0 "$pid" 2>/dev/null; then
    log "stopping the dockerd this script started (pid $pid)"
    kill -TERM "$pid"
    local i; for i in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  fi
  rm -f "$STATE_DIR/dockerd.pid"
}

compose() {
  if docker compose version >/dev/null 2>&1; then
    (cd "$DEPLOY" && docker compose "$@")
  else
    (cd "$DEPLOY" && docker-compose "$@")
  fi
}

take_down() {
  log "down: containers, networks and volumes of project $(project)"
  compose --profile tools down -v --remove-orphans >&2 || true
  if [[ $PURGE -eq 1 ]]; then
    docker image rm -f fednnunet/runtime:local fednnunet/rabbitmq:local fednnunet/redis:local \
      fednnunet/s3:local fednnunet/flower:local local/debian:bookworm >/dev/null 2>&1 || true
  fi
}

project() { grep -E '^COMPOSE_PROJECT_NAME=' "$DEPLOY/.env" 2>/dev/null | cut -d= -f2 || echo fednnunet; }

if [[ $ONLY_DOWN -eq 1 ]]; then
  if docker info >/dev/null 2>&1; then take_down; fi
  stop_engine_if_ours
  exit 0
fi

# A run that fails part way (a build, the health wait, the experiment) leaves nothing
# behind either: the stack is taken down and an engine this script started is stopped.
down_on_failure() {
  local rc=$?
  [[ $rc -ne 0 && $KEEP -eq 0 ]] || return 0
  log "failed (exit $rc): taking the stack down (--keep leaves it up)"
  take_down || true
  stop_engine_if_ours || true
}

# ------------------------------------------------------------------ up
T_ALL=$(now)
ensure_engine
trap down_on_failure EXIT
PYTHONPATH="$REPO" "$PY" "$DEPLOY/generate.py"
T=$(now); "$DEPLOY/docker/build.sh"; log "images ready in $(since "$T") s"

T=$(now)
compose up -d >&2
wait_healthy() {
  local want=(rabbitmq redis s3) name cid status i
  for i in $(seq 1 240); do
    local ok=1
    for name in "${want[@]}"; do
      cid="$(compose ps -q "$name")"
      status="$(docker inspect -f '{{.State.Health.Status}}' "$cid" 2>/dev/null || echo none)"
      [[ "$status" == healthy ]] || ok=0
    done
    for name in coordinator site-901 site-902 site-903; do
      # ready = the Celery worker consumes its queue (torch import takes a while);
      # `experiment start --watch` gives up if the coordinator is not consuming yet
      compose logs --no-color --tail=200 "$name" 2>/dev/null | grep -q "@.* ready\." || ok=0
    done
    [[ $ok -eq 1 ]] && return 0
    sleep 1
  done
  log "stack not healthy after 240 s"; compose ps >&2; return 1
}
wait_healthy
log "compose up -> healthy, coordinator and sites ready in $(since "$T") s"

# ------------------------------------------------------------------ experiment
EXP="demo-$(date +%Y%m%d-%H%M%S)"
status_json() { compose exec -T coordinator fednnunet experiment status "$EXP" --json 2>/dev/null; }
field() { "$PY" -c "import json,sys; d=json.load(sys.stdin); print($1)" 2>/dev/null; }

restart_mid_round() { # waits for round 2 running, restarts the services, logs the gap
  local svc round=0
  while :; do
    round="$(status_json | field 'd["round"] if d["phase"]=="train" else 0' || echo 0)"
    [[ "${round:-0}" -ge 2 ]] && break
    sleep 5
  done
  for svc in "${RESTARTS[@]}"; do
    local t; t=$(now)
    log "restarting $svc during round $round"
    compose restart "$svc" >&2
    log "$svc restarted in $(since "$t") s"
  done
}

TTY=(-T); [[ -t 1 ]] && TTY=()
RESTART_PID=""
if [[ ${#RESTARTS[@]} -gt 0 ]]; then restart_mid_round & RESTART_PID=$!; fi
T=$(now)
compose run --rm "${TTY[@]}" client fednnunet experiment start /specs/demo.yml \
  --id "$EXP" --rounds "$ROUNDS" --watch || true
# The live view may end early (e.g. interrupted): follow the state until it ends; an
# experiment the coordinator does not know (the start was refused) ends the demo.
UNKNOWN=0
while :; do
  if STATUS="$(status_json)"; then
    UNKNOWN=0
    field 'd["phase"] in ("done", "failed", "cancelled") or sys.exit(1)' <<<"$STATUS" \
      >/dev/null && break
  elif [[ $((UNKNOWN += 1)) -ge 6 ]]; then
    log "experiment $EXP is unknown to the coordinator (start refused? see above)"; exit 1
  fi
  sleep 5
done
WALL=$(since "$T")
[[ -n "$RESTART_PID" ]] && wait "$RESTART_PID" 2>/dev/null || true
status_json >"$STATE_DIR/$EXP.json"
log "experiment $EXP: $(field 'd["phase"]' <"$STATE_DIR/$EXP.json") in $WALL s (status: $STATE_DIR/$EXP.json)"
"$PY" - "$STATE_DIR/$EXP.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
for site, m in sorted(d["final_metrics"].items()):
    print(f"site {site}: mean Dice {m.get('mean_dice')}")
for r in d["history"]:
    print(f"round {r['round']}: {r['wall_s']:.1f} s participants {r['participants']} late {r['late']}")
EOF
PHASE="$(field 'd["phase"]' <"$STATE_DIR/$EXP.json")"

trap - EXIT
if [[ $KEEP -eq 0 ]]; then take_down; stop_engine_if_ours; fi
log "total $(since "$T_ALL") s"
[[ "$PHASE" == done ]]
