# syntax=docker/dockerfile:1
# The product image: one image, two commands (`presence gateway`, `presence worker`), plus `presence create-topics`.
#   docker build -t rongcloud-presence .
#   docker run --rm -e PRESENCE_... rongcloud-presence gateway

FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/presence
WORKDIR /src
# Dependencies first, so a code change does not reinstall them.
COPY pyproject.toml README.md ./
RUN mkdir core gateway streams presence \
    && touch core/__init__.py gateway/__init__.py streams/__init__.py presence/__init__.py \
    && /opt/presence/bin/pip install . \
    && /opt/presence/bin/pip uninstall -y rongcloud-presence
COPY core ./core
COPY gateway ./gateway
COPY streams ./streams
COPY presence ./presence
RUN /opt/presence/bin/pip install --no-deps . \
    && /opt/presence/bin/python -c "import gateway.main, streams.main, presence.cli"

FROM python:3.11-slim-bookworm
ARG UID=10001
RUN groupadd --system --gid "${UID}" presence \
    && useradd --system --uid "${UID}" --gid presence --home-dir /var/lib/presence --shell /usr/sbin/nologin presence \
    && mkdir -p /var/lib/presence/spool /var/lib/presence/streams \
    && chown -R presence:presence /var/lib/presence
COPY --from=build /opt/presence /opt/presence
ENV PATH=/opt/presence/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PRESENCE_GATEWAY_SPOOL_DIR=/var/lib/presence/spool \
    PRESENCE_WORKER_DATA_DIR=/var/lib/presence/streams
WORKDIR /var/lib/presence
USER 10001:10001
# 8080: the gateway (webhook, /healthz, /readyz, /metrics); 6066: a worker (queries, /healthz, /readyz, /metrics).
EXPOSE 8080 6066
VOLUME ["/var/lib/presence/spool", "/var/lib/presence/streams"]
ENTRYPOINT ["presence"]
CMD ["gateway"]
