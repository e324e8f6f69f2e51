# Redis from Debian; AOF on (round state survives a restart). The password comes from
# the environment (deploy/.env) into a config file, never onto the command line.
ARG BASE=local/debian:bookworm
FROM ${BASE}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* && mkdir -p /data && chown redis:redis /data
COPY files/entrypoint.sh /usr/local/bin/entrypoint.sh
EXPOSE 6379
VOLUME /data
ENTRYPOINT ["/usr/local/bin/entrypoint.sh"]
