#!/bin/sh
# redis.conf written at start from REDIS_PASSWORD (required): AOF, fsync every second.
set -eu
: "${REDIS_PASSWORD:?REDIS_PASSWORD is required (deploy/.env, see deploy/generate.py)}"
umask 077
conf=/run/redis/redis.conf
mkdir -p /run/redis
cat >"$conf" <<CONF
bind 0.0.0.0
protected-mode no
port 6379
dir /data
appendonly yes
appendfsync everysec
requirepass $REDIS_PASSWORD
CONF
chown -R redis:redis /run/redis /data
unset REDIS_PASSWORD
exec setpriv --reuid=redis --regid=redis --init-groups redis-server "$conf"
