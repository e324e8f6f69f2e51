# Celery Flower dashboard. Broker URL, management API URL and basic-auth credentials come
# from the environment (CELERY_BROKER_URL, FLOWER_BROKER_API, FLOWER_BASIC_AUTH), never
# from the command line.
ARG BASE=local/debian:bookworm
FROM ${BASE}
ARG WHEELS
ARG LOCK_SHA
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
        ca-certificates && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv \
    && echo "flower.lock $LOCK_SHA" \
    && pip install --no-index --no-deps --find-links "$WHEELS" -r "${WHEELS}flower.lock" \
    && pip check \
    && useradd --create-home --uid 10003 flower
USER flower
EXPOSE 5555
CMD ["celery", "flower", "--port=5555"]
