# One `dht node` per container. The compose file (docker-compose.yml) runs three PoPs of two
# nodes with mutual TLS; the health check lives there (python + urllib against /readyz over
# HTTPS: slim has no curl).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Only what the package build needs (.dockerignore keeps tests, caches and VCS out).
COPY . .
RUN pip install --no-cache-dir . \
    && rm -rf /src

# /certs, owned by dht: a fresh named volume mounted there takes this directory's owner
# and mode, so the compose file's `certs` service (running as dht) can write into it and
# the nodes can read their keys (mode 0600).
RUN useradd --system --uid 10001 --create-home --shell /usr/sbin/nologin dht \
    && install -d -o dht -g dht -m 0700 /certs
USER dht
WORKDIR /home/dht

# The docker profile's default ports: the public gRPC plane (FlowTable, grpc.health.v1,
# reflection) for forwarders, the HTTP(S) admin endpoint, and the peer gRPC plane
# (NodeInternal, PopLink) for other nodes (docs/security.md#planes).
EXPOSE 7000 8000 9000

ENTRYPOINT ["dht"]
CMD ["node", "--help"]
