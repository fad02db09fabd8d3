# ratelimit-svc: the service alone, configured only by environment variables (as the reference's
# image). docker-compose.yaml runs it with the rules in config/ and Redis.
#   docker build -t ratelimit-svc .
FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
# Wheels of the package and its dependencies, so the final image gets no build tools or sources.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.12-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 ratelimit \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin ratelimit
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels ratelimit-svc \
    && rm -rf /wheels
# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
# HTTP (/healthcheck, /json), gRPC, debug, Prometheus (with USE_PROMETHEUS=true).
EXPOSE 8080 8081 6070 9090
ENTRYPOINT ["ratelimit"]
