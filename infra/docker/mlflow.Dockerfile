# syntax=docker/dockerfile:1
# The MLflow tracking server image that infra/mlflow/ deploys: the client's MLflow version (pinned
# in pyproject.toml), the PostgreSQL driver (mlflow[db]) and boto3 for the S3 artifact proxy.
# It needs no build context:
#   docker build -t YOUR-REGISTRY/lladav-mlflow:3.17.2 - < infra/docker/mlflow.Dockerfile
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install "mlflow[db]==3.17.2" "boto3==1.44.5" \
    && useradd -m -u 1000 mlflow
USER mlflow
EXPOSE 5000
# The command (backend store, artifact destination, allowed hosts) is set by the deployment.
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
