#!/bin/sh
# Copy the mounted (root-only, mode 600) config into place for the rabbitmq user, then
# run the server as that user. Secrets stay out of the image and off command lines.
set -eu
for f in rabbitmq.conf definitions.json; do
  if [ -f "/run/fednnunet/$f" ]; then
    install -o rabbitmq -g rabbitmq -m 600 "/run/fednnunet/$f" "/etc/rabbitmq/$f"
  fi
done
chown -R rabbitmq:rabbitmq /var/lib/rabbitmq
exec setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups env HOME=/var/lib/rabbitmq "$@"
