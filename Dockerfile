# ratelimit-svc: the service alone, configured only by environment variables (as the reference's
# image). docker-compose.yaml runs it with the rules in config/ and Redis; deploy/helm runs it on
# Kubernetes (docs/deployment.md (Image)).
#   docker build -t ratelimit-svc .
#
# The base is pinned by digest, so a rebuild gets the same bytes. The digest below is the one
# recorded for python:3.11.10-slim-bookworm on 2024-10-19; refresh it (security fixes) with
#   docker buildx imagetools inspect python:3.11-slim-bookworm --format '{{json .Manifest.Digest}}'
# and put the new tag and digest on both FROM lines (docs/deployment.md (Updating the base image)).

# -- build: a venv with exactly the packages in requirements.lock, then the service ----------
FROM python:3.11.10-slim-bookworm@sha256:5148c0e4bbb64271bca1d3322360ebf4bfb7564507ae32dd639322e4952a6b16 AS build
ENV PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY scripts/build_venv.sh requirements.lock ./
# Dependencies first: this layer is reused until requirements.lock changes.
RUN sh build_venv.sh deps /opt/ratelimit
# A C compiler for the request path's modules (setup.py, mypyc: docs/performance.md (Compiled
# modules)); only in this stage, the runtime stage gets the built venv.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml setup.py README.md LICENSE ./
COPY src ./src
RUN sh build_venv.sh app /opt/ratelimit

# -- runtime: the venv on a clean slim base, no build files, not root ------------------------
FROM python:3.11.10-slim-bookworm@sha256:5148c0e4bbb64271bca1d3322360ebf4bfb7564507ae32dd639322e4952a6b16
ENV PATH=/opt/ratelimit/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 ratelimit \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin ratelimit
COPY --from=build /opt/ratelimit /opt/ratelimit
COPY LICENSE /usr/share/doc/ratelimit-svc/LICENSE
# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
# HTTP (/healthcheck, /json), gRPC, debug, Prometheus (with USE_PROMETHEUS=true).
EXPOSE 8080 8081 6070 9090
ENTRYPOINT ["ratelimit"]
