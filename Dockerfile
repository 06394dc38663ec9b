# syntax=docker/dockerfile:1
# The product image: one image, two commands (`presence gateway`, `presence worker`), plus `presence create-topics`.
#   docker build -t rongcloud-presence .
#   docker run --rm -e PRESENCE_... rongcloud-presence gateway
# scripts/container-check builds it and runs both services as docker-compose.yml does (docs/operations.md).
#
# Reproducible: the base is pinned by digest and every Python package comes from requirements.lock, pinned with
# hashes (regenerate it with scripts/lock). The build fetches nothing else.
#
# The digest is the multi-platform index of python:3.11-slim-bookworm (Python 3.11.16, Debian 12) as recorded by
# the official images' repo-info (repos/python/remote/3.11-slim-bookworm.md; its linux/amd64 image is
# sha256:2fc9207f64226cb05ac317cee0bab6fa55a9ea311ce5a086baddd4b4a83c2d3c). It was read from that record and has not
# been pulled yet: so far the image was built only on the Debian 12 stand-in of scripts/container-check --local-base.
# The first build with registry access confirms it (a wrong digest fails the pull). To move to a newer base:
#   docker buildx imagetools inspect python:3.11-slim-bookworm     (the "Digest:" line)
# BASE_IMAGE may name another Debian 12 image with Python 3.11 on PATH as `python` (scripts/container-check
# --local-base builds such a stand-in where no registry is reachable).
ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm@sha256:0bee7276f83efd4a1ee05bbbf4281d95ed28e079220a9457f25a93e3f1e3c31b

FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
RUN python -m venv /opt/presence
WORKDIR /src
# Dependencies first, so a code change does not reinstall them. Wheels only: nothing is compiled in the build, and
# every file is checked against its hash in the lock (setuptools and wheel included, for the project's own build).
# Behind a TLS-inspecting proxy, give pip the proxy's CA bundle as a build secret (never stored in a layer):
#   docker build --secret id=pip-ca,src=/etc/ssl/certs/ca-certificates.crt .
COPY requirements.lock ./
RUN --mount=type=secret,id=pip-ca \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
    && /opt/presence/bin/pip install --no-deps --require-hashes --only-binary=:all: -r requirements.lock
# Every package of pyproject.toml's [tool.setuptools.packages.find] include (tests/ops/test_image.py checks).
COPY pyproject.toml README.md ./
COPY core ./core
COPY gateway ./gateway
COPY streams ./streams
COPY presence ./presence
# --no-build-isolation: build with the locked setuptools already installed instead of fetching one.
# pip check: the lock covers every dependency. Then the installers leave: the runtime needs none of them.
RUN /opt/presence/bin/pip install --no-deps --no-build-isolation --no-index . \
    && /opt/presence/bin/pip check \
    && /opt/presence/bin/python -m pip uninstall --yes setuptools wheel pip \
    && /opt/presence/bin/python -c "import gateway.main, streams.main, presence.cli"

FROM ${BASE_IMAGE}
ARG BASE_IMAGE
ARG UID=10001
# OCI annotations. VERSION follows pyproject.toml (tests/ops/test_image.py checks); scripts/container-check passes
# REVISION (the git commit) and CREATED (its commit time, so that a rebuild of one commit labels alike).
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="rongcloud-presence" \
      org.opencontainers.image.description="Presence from RongCloud online-status webhooks: webhook gateway and streams worker (Kafka, Faust)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
# The base's own pip, setuptools and wheel go too (the official image installs them next to Python): nothing in
# the running image can install packages. Then one user and group, both ${UID}, owns the two writable directories.
RUN if python -m pip --version >/dev/null 2>&1; then \
        python -m pip uninstall --yes --no-cache-dir --disable-pip-version-check pip setuptools wheel; \
    fi \
    && groupadd --system --gid "${UID}" presence \
    && useradd --system --uid "${UID}" --gid presence --home-dir /var/lib/presence --shell /usr/sbin/nologin presence \
    && mkdir -p /var/lib/presence/spool /var/lib/presence/streams \
    && chown -R "${UID}:${UID}" /var/lib/presence
COPY --from=build /opt/presence /opt/presence
ENV PATH=/opt/presence/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PRESENCE_GATEWAY_SPOOL_DIR=/var/lib/presence/spool \
    PRESENCE_WORKER_DATA_DIR=/var/lib/presence/streams
RUN for module in pip setuptools wheel; do \
        if python -c "import $module" 2>/dev/null; then echo "$module is still importable" >&2; exit 1; fi; \
    done \
    && presence --help >/dev/null
WORKDIR /var/lib/presence
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER ${UID}:${UID}
# 8080: the gateway (webhook, /healthz, /readyz, /metrics); 6066: a worker (queries, /healthz, /readyz, /metrics).
EXPOSE 8080 6066
VOLUME ["/var/lib/presence/spool", "/var/lib/presence/streams"]
ENTRYPOINT ["presence"]
CMD ["gateway"]
