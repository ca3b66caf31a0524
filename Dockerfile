# One `dht node` per container. The compose file (docker-compose.yml) runs a PoP of three;
# the health check lives there (python + urllib against /readyz: slim has no curl).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Only what the package build needs (.dockerignore keeps tests, caches and VCS out).
COPY . .
RUN pip install --no-cache-dir . \
    && rm -rf /src

RUN useradd --system --uid 10001 --create-home --shell /usr/sbin/nologin dht
USER dht
WORKDIR /home/dht

# gRPC (FlowTable, grpc.health.v1, reflection) and the HTTP admin endpoint: the docker
# profile's default ports.
EXPOSE 7000 8000

ENTRYPOINT ["dht"]
CMD ["node", "--help"]
