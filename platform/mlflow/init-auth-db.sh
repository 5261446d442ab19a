#!/usr/bin/env bash
# Run by the postgres image once, when it initialises its volume: the auth app's users and permissions get
# their own database next to the tracking store.
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" -c "CREATE DATABASE mlflow_auth"
