# syntax=docker/dockerfile:1
# The MLflow tracking server of deploy/compose: the same mlflow release as the client
# driftloop is tested with, plus the two drivers its production setup needs
# (docs/mlflow.md): psycopg 3 for the PostgreSQL backend store, boto3 for the S3
# artifact store it proxies (--serve-artifacts). Built rather than pulled so that the
# server and driftloop's client never drift apart by a major version.
FROM python:3.11.14-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
ARG MLFLOW_VERSION=3.17.2
RUN pip install "mlflow==${MLFLOW_VERSION}" "psycopg[binary]>=3.2,<4" "boto3>=1.34,<2" \
 && groupadd --system --gid 10002 mlflow \
 && useradd --system --uid 10002 --gid mlflow --create-home --shell /usr/sbin/nologin mlflow

USER 10002:10002
WORKDIR /home/mlflow
EXPOSE 5000

HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=5 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=4)"]

# The stores and allowed hosts come from MLFLOW_* variables (see compose.yaml), so
# that the database password never appears on a command line.
ENTRYPOINT ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000", "--serve-artifacts"]
