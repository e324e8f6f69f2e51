#!/usr/bin/env bash
# Build every image of the compose stack from local material only (no registry pulls).
#
#   deploy/docker/build.sh            base (cached) + wheelhouse (cached) + all images
#   deploy/docker/build.sh runtime    only the named image(s): runtime rabbitmq redis s3 flower
#
# 1. base: `debootstrap --variant=minbase bookworm` + `docker import` -> local/debian:bookworm
#    (skipped when the image exists; the rootfs tarball is kept in the cache).
# 2. wheelhouse: `pip download` of this project's dependencies (pinned torch/torchvision),
#    flower and the build tools into $CACHE/wheels, using the host's pip configuration (its
#    indexes, local wheel folders and CA bundle), plus runtime.lock / flower.lock (exact
#    versions). Redone only when pyproject.toml or this script changed.
# 3. images: `docker build --network host` of deploy/docker/<name>.Dockerfile. Python
#    packages are installed with `pip --no-index --find-links http://127.0.0.1:<port>/`
#    from a throwaway HTTP server on the host that serves the wheelhouse (so 3 GB of
#    wheels never enter a build context or a layer); apt packages come from Debian.
#
# Environment: FEDNNUNET_DOCKER_CACHE (default ~/.cache/fednnunet-docker),
# FEDNNUNET_IMAGE_TAG (default local), FEDNNUNET_WHEEL_PORT (default 38271),
# DEBIAN_MIRROR (default http://deb.debian.org/debian), PYTHON (host python with pip).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HERE="$REPO/deploy/docker"
CACHE="${FEDNNUNET_DOCKER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fednnunet-docker}"
TAG="${FEDNNUNET_IMAGE_TAG:-local}"
BASE_IMAGE="local/debian:bookworm"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PY="${PYTHON:-}"
[[ -n "$PY" ]] || { [[ -x "$REPO/.venv/bin/python" ]] && PY="$REPO/.venv/bin/python" || PY="$(command -v python3)"; }
ALL_IMAGES=(runtime rabbitmq redis s3 flower)
IMAGE_PY_EXTRAS="async-timeout>=4.0.3"
NICE=(nice -n "${FEDNNUNET_BUILD_NICE:-15}")

log() { printf '[build %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

build_base() {
  if image_exists "$BASE_IMAGE"; then log "base $BASE_IMAGE: cached"; return 0; fi
  mkdir -p "$CACHE"
  local tarball="$CACHE/debian-bookworm-minbase.tar"
  if [[ ! -s "$tarball" ]]; then
    command -v debootstrap >/dev/null || { log "debootstrap missing: apt-get install debootstrap"; return 1; }
    [[ $EUID -eq 0 ]] || { log "debootstrap needs root"; return 1; }
    local root="$CACHE/rootfs"
    rm -rf "$root"
    log "debootstrap minbase bookworm from $MIRROR"
    "${NICE[@]}" debootstrap --variant=minbase bookworm "$root" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
      || { tail -n 20 "$CACHE/debootstrap.log" >&2; return 1; }
    # Same package sources as a stock Debian image (security + updates).
    cat >"$root/etc/apt/sources.list" <<SRC
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb ${MIRROR%/debian}/debian-security bookworm-security main
SRC
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
    rm -rf "$root"
  fi
  log "import $tarball as $BASE_IMAGE"
  docker import "$tarball" "$BASE_IMAGE" >/dev/null
}

wheelhouse_stamp() { sha256sum "$REPO/pyproject.toml" "$HERE/build.sh" | sha256sum | cut -c1-16; }

lock() { # lock NAME REQ...: exact versions (name==version) the host's resolver picks from
  # the wheelhouse alone; images install them with --no-deps (no resolver in the build:
  # Debian's pip 23 spent minutes backtracking over the same set).
  local name="$1"; shift
  "$PY" -m pip install -q --dry-run --ignore-installed --no-index --find-links "$CACHE/wheels" \
    --report "$CACHE/wheels/$name.report.json" "$@" 2>&1 | grep -v "^WARNING: Location" >&2 || true
  "$PY" - "$CACHE/wheels/$name.report.json" >"$CACHE/wheels/$name.lock" <<'PYEOF'
import json, sys
for item in json.load(open(sys.argv[1]))["install"]:
    meta = item["metadata"]
    if meta["name"] != "fednnunet":
        print(f"{meta['name']}=={meta['version']}")
PYEOF
  rm -f "$CACHE/wheels/$name.report.json"
  [[ -s "$CACHE/wheels/$name.lock" ]] || { log "could not lock $name"; return 1; }
}

build_wheelhouse() {
  local wh="$CACHE/wheels" stamp
  stamp="$(wheelhouse_stamp)"
  if [[ -f "$wh/.stamp" && "$(cat "$wh/.stamp")" == "$stamp" ]]; then
    log "wheelhouse: cached ($(du -sh "$wh" | cut -f1))"; return 0
  fi
  mkdir -p "$wh"
  log "wheelhouse: pip download into $wh"
  # Only the dependency metadata matters: a stub project with this pyproject.toml, so
  # the project itself is not built into the wheelhouse (its code goes into the image).
  local proj="$CACHE/project-meta"
  rm -rf "$proj"; mkdir -p "$proj/fednnunet"
  cp "$REPO/pyproject.toml" "$proj/"; : >"$proj/README.md"; : >"$proj/fednnunet/__init__.py"
  "${NICE[@]}" "$PY" -m pip download -q -d "$wh" "$proj" "flower==2.2.0" \
    "setuptools>=68" wheel 2>&1 | grep -v "^WARNING: Location" >&2 || true
  rm -f "$wh"/fednnunet-*.whl "$wh"/fednnunet-*.tar.gz
  ls "$wh"/torch-*.whl >/dev/null 2>&1 || { log "wheelhouse has no torch wheel"; return 1; }
  # The images run Debian's Python 3.11.2: requirements behind a python_full_version
  # marker that the host's newer 3.11 skips must be added here (redis: async-timeout).
  "${NICE[@]}" "$PY" -m pip download -q -d "$wh" $IMAGE_PY_EXTRAS 2>&1 \
    | grep -v "^WARNING: Location" >&2 || true
  lock runtime "$proj" $IMAGE_PY_EXTRAS
  lock flower "flower==2.2.0"
  rm -rf "$proj"
  echo "$stamp" >"$wh/.stamp"
}

SERVER_PID=""
serve_wheels() { # throwaway HTTP server on 127.0.0.1 for --find-links
  # A fixed port: the URL is a build argument, and a changed build argument would
  # invalidate every cached layer after it.
  local port="${FEDNNUNET_WHEEL_PORT:-38271}"
  if curl -s -o /dev/null "http://127.0.0.1:$port/"; then
    log "port $port is taken: set FEDNNUNET_WHEEL_PORT"; return 1
  fi
  "$PY" -m http.server --bind 127.0.0.1 --directory "$CACHE/wheels" "$port" >/dev/null 2>&1 &
  SERVER_PID=$!
  trap 'kill "$SERVER_PID" 2>/dev/null || true' EXIT
  local i
  for i in $(seq 1 50); do
    curl -fs -o /dev/null "http://127.0.0.1:$port/" && { WHEELS_URL="http://127.0.0.1:$port/"; return 0; }
    sleep 0.1
  done
  log "wheel server did not start"; return 1
}

context_for() { # minimal build context per image (the classic builder sends all of it)
  local name="$1" ctx="$CACHE/context/$name"
  rm -rf "$ctx"; mkdir -p "$ctx"
  cp "$HERE/$name.Dockerfile" "$ctx/Dockerfile"
  [[ -d "$HERE/$name" ]] && cp -r "$HERE/$name" "$ctx/files"
  if [[ "$name" == runtime ]]; then
    cp "$REPO/pyproject.toml" "$ctx/"
    [[ -f "$REPO/README.md" ]] && cp "$REPO/README.md" "$ctx/"
    (cd "$REPO" && tar --exclude=__pycache__ --exclude='*.pyc' -cf - fednnunet) | tar -C "$ctx" -xf -
  fi
  echo "$ctx"
}

build_image() {
  local name="$1" ctx t0
  ctx="$(context_for "$name")"
  t0=$(date +%s)
  log "image fednnunet/$name:$TAG"
  "${NICE[@]}" docker build --network host -q \
    --build-arg BASE="$BASE_IMAGE" --build-arg WHEELS="$WHEELS_URL" \
    --build-arg LOCK_SHA="$(sha256sum "$CACHE/wheels/$name.lock" 2>/dev/null | cut -c1-16)" \
    -t "fednnunet/$name:$TAG" "$ctx" >/dev/null
  log "image fednnunet/$name:$TAG done in $(( $(date +%s) - t0 )) s ($(docker image inspect -f '{{.Size}}' "fednnunet/$name:$TAG" | awk '{printf "%.0f MB", $1/1e6}'))"
}

main() {
  docker info >/dev/null 2>&1 || { log "no Docker engine reachable (docker info failed)"; return 1; }
  local images=("$@")
  [[ ${#images[@]} -gt 0 ]] || images=("${ALL_IMAGES[@]}")
  build_base
  build_wheelhouse
  serve_wheels
  local name
  for name in "${images[@]}"; do build_image "$name"; done
}

main "$@"
