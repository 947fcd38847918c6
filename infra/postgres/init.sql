-- Runs once, on the first start of an empty Postgres volume (docker-entrypoint-initdb.d):
-- POSTGRES_DB creates `prefect`; MLflow's tracking + model registry store gets its own database.
CREATE DATABASE mlflow;
