#!/bin/sh
# Make the compose stack's MinIO bucket this project's default DVC remote (run from the repository root, after
# `docker compose -f infra/docker-compose.yml up -d`). Needs the S3 plugin: pip install dvc-s3.
# The endpoint and bucket go into .dvc/config (committed); the credentials into .dvc/config.local (git-ignored).
#   sh infra/dvc-remote.sh [env-file]        (default infra/.env)
set -eu
ENV_FILE="${1:-infra/.env}"
[ -f "$ENV_FILE" ] || { echo "no $ENV_FILE: cp infra/.env.example infra/.env and edit it" >&2; exit 2; }
set -a; . "$ENV_FILE"; set +a
REMOTE="${DVC_REMOTE_NAME:-minio}"
dvc remote add --default --force "$REMOTE" "s3://${DVC_BUCKET:-dvc}/moa"
dvc remote modify "$REMOTE" endpointurl "http://127.0.0.1:${MINIO_PORT:-9000}"
dvc remote modify --local "$REMOTE" access_key_id "$MINIO_ROOT_USER"
dvc remote modify --local "$REMOTE" secret_access_key "$MINIO_ROOT_PASSWORD"
echo "DVC remote '$REMOTE' -> s3://${DVC_BUCKET:-dvc}/moa at http://127.0.0.1:${MINIO_PORT:-9000} (dvc push / dvc pull)"
