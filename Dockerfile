# StreamFlow Serving images. The default (last) stage is the gRPC server; `--target tools` builds the image
# docker-compose.yml uses for the one-shot bootstrap job and the MLflow tracking server.
# Every stage installs with deploy/constraints.txt, the versions the test suite ran with. The build context
# is an allowlist (.dockerignore): the package's sources, pyproject.toml, README.md and those two files.

FROM python:3.11-slim-bookworm AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# A fixed non-root uid, so Kubernetes' runAsNonRoot can verify it and volume ownership is predictable.
RUN groupadd --system --gid 10001 streamflow \
    && useradd --system --uid 10001 --gid streamflow --home-dir /app --create-home streamflow
WORKDIR /app
COPY deploy/constraints.txt deploy/serving-requirements.txt /tmp/deploy/


# Bootstrap (data, Feast, training) and the MLflow tracking server: the whole package with every dependency.
FROM base AS tools
COPY . /tmp/src/
RUN pip install --no-cache-dir -c /tmp/deploy/constraints.txt /tmp/src \
    && rm -rf /tmp/src \
    && mkdir -p /data/mlflow-artifacts \
    && chown streamflow:streamflow /data/mlflow-artifacts
USER 10001:10001
ENV STREAMFLOW_PROFILE=production


# The server: only what serving imports (no training libraries, plotting, MLflow server or dev tools).
FROM base AS serving
RUN pip install --no-cache-dir -r /tmp/deploy/serving-requirements.txt -c /tmp/deploy/constraints.txt
COPY . /tmp/src/
# The package itself only: its dependencies are the serving set installed above.
RUN pip install --no-cache-dir --no-deps /tmp/src \
    && rm -rf /tmp/src
USER 10001:10001
ENV STREAMFLOW_PROFILE=production \
    STREAMFLOW_HOST=0.0.0.0 \
    STREAMFLOW_PORT=50051 \
    STREAMFLOW_HEALTH_PORT=50052 \
    STREAMFLOW_HTTP_PORT=8080 \
    STREAMFLOW_METRICS_PORT=9464
# Prometheus /metrics of every worker process.
EXPOSE 9464
# grpc.health.v1 alone, plaintext and without a token, for probes (also when 50051 speaks TLS).
EXPOSE 50052
# The PredictionService over HTTP: Connect JSON, gRPC-Web (with the gRPC port's TLS and tokens).
EXPOSE 8080
EXPOSE 50051
# Probes the health port (STREAMFLOW_HEALTH_PORT): it answers whether or not the gRPC port speaks TLS.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-m", "streamflow.healthcheck"]
ENTRYPOINT ["streamflow", "serve"]
