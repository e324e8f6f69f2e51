# RabbitMQ from Debian with the management plugin (Flower reads queues through its API).
# Configuration and definitions (users, permissions, topology) are mounted at run time
# from deploy/.generated: the image holds no credentials.
ARG BASE=local/debian:bookworm
FROM ${BASE}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update && apt-get install -y --no-install-recommends rabbitmq-server \
    && rm -rf /var/lib/apt/lists/* && rabbitmq-plugins enable --offline rabbitmq_management
COPY files/entrypoint.sh /usr/local/bin/entrypoint.sh
EXPOSE 5672 15672
ENTRYPOINT ["/usr/local/bin/entrypoint.sh"]
CMD ["rabbitmq-server"]
