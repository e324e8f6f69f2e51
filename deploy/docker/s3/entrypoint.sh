#!/bin/bash
# `weed mini` binds master, volume, filer and S3 to one address. The filer and master
# HTTP APIs have no authentication, so they must not be reachable from the site
# containers: weed binds 127.0.0.1 only, and socat exposes just the S3 port (8333).
# Volumes of 1 GB, as in deploy/local/stack.sh: filling a 256 MB one stalled the next
# PUT 0.15-1 s (every 8th 31 MB update of a site bucket); volume files grow as written.
set -euo pipefail
install -o weed -m 600 /run/fednnunet/identities.json /run/identities.json
chown -R weed /data
setpriv --reuid=weed --regid=weed --init-groups env HOME=/data GOMEMLIMIT="${GOMEMLIMIT:-512MiB}" \
  weed mini -dir=/data -ip=127.0.0.1 -ip.bind=127.0.0.1 -s3.port=8334 \
  -s3.config=/run/identities.json -admin.ui=false -webdav=false -master.telemetry=false \
  -master.volumeSizeLimitMB=1024 -volume.max=4000 -s3.port.iceberg=0 -s3.port.lance=0 &
weed_pid=$!
setpriv --reuid=weed --regid=weed --init-groups socat TCP-LISTEN:8333,fork,reuseaddr TCP:127.0.0.1:8334 &
socat_pid=$!
trap 'kill -TERM $weed_pid $socat_pid 2>/dev/null || true' TERM INT
wait -n $weed_pid $socat_pid || true
kill -TERM $weed_pid $socat_pid 2>/dev/null || true
wait
exit 1
