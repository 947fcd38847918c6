# MLflow tracking server for infra/docker-compose.yml: the same MLflow version as moa's pyproject.toml, plus the
# Postgres driver (backend store) and boto3 (S3 artifact store on MinIO, proxied through the server).
FROM python:3.11-slim
RUN pip install --no-cache-dir "mlflow==3.17.2" "psycopg2-binary>=2.9" "boto3>=1.34"
RUN useradd --create-home --uid 10001 mlflow
USER mlflow
EXPOSE 5000
