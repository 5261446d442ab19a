#!/usr/bin/env bash
# The team MLflow server: PostgreSQL backend store, S3 (or GCS) artifact store proxied by the server, MLflow's
# basic auth. Configured only through the environment, so no secret lives in a committed file:
#   MLFLOW_BACKEND_STORE_URI       postgresql+psycopg://mlflow@db-host:5432/mlflow  (password: PGPASSWORD or ~/.pgpass)
#   MLFLOW_AUTH_DATABASE_URI       users and permissions, e.g. postgresql+psycopg://mlflow@db-host:5432/mlflow_auth
#   MLFLOW_ARTIFACTS_DESTINATION   s3://bucket/mlflow-artifacts or gs://bucket/mlflow-artifacts
#   MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD   admin created on the first start (password >= 12 chars)
#   MLFLOW_FLASK_SERVER_SECRET_KEY  static key for the auth app's CSRF protection
#   MLFLOW_HOST (default 127.0.0.1), MLFLOW_PORT (default 5000), MLFLOW_ALLOWED_HOSTS (needed when not loopback)
#   MLFLOW_S3_ENDPOINT_URL, AWS_* / GOOGLE_APPLICATION_CREDENTIALS   how the server reaches the artifact store
#   MLFLOW_AUTH_DEFAULT_PERMISSION (default READ: everyone reads everything, writes only their own experiments)
#   MLFLOW_AUTH_CACHE_TTL_S (default 60): seconds a checked password is remembered (see the ini below; 0: off)
# Extra arguments go to `mlflow server`.
set -euo pipefail

missing=()
for v in MLFLOW_BACKEND_STORE_URI MLFLOW_AUTH_DATABASE_URI MLFLOW_ARTIFACTS_DESTINATION \
         MLFLOW_AUTH_ADMIN_USERNAME MLFLOW_FLASK_SERVER_SECRET_KEY; do
    [ -n "${!v:-}" ] || missing+=("$v")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "platform/mlflow/start.sh: set ${missing[*]} (see the comment at the top of this script)" >&2
    exit 2
fi

host="${MLFLOW_HOST:-127.0.0.1}"
port="${MLFLOW_PORT:-5000}"

# The auth app reads its settings from an ini file; write it at run time (no secrets in it: the admin password
# comes from MLFLOW_AUTH_ADMIN_PASSWORD, which MLflow reads itself).
# auth_cache_ttl_seconds: a checked user:password is remembered for that long (MLflow keeps it off by default).
# Without it every request runs the password's scrypt hash (~100 ms of CPU here): one worker then serves at most
# ~10 authenticated requests a second, and a cluster's trials logging metrics kept the server busy hashing (the
# two-node tests: 147 s of the server's CPU, nearly all of it). A password change, a deletion or an admin flag set
# through the API takes effect at once (one worker, and MLflow drops that user's entries); a change made in the
# database directly, after at most the TTL. MLFLOW_AUTH_CACHE_TTL_S=0 turns it off.
auth_dir="${MLFLOW_AUTH_CONFIG_DIR:-$(mktemp -d -t mlflow-auth.XXXXXX)}"
mkdir -p "$auth_dir"
export MLFLOW_AUTH_CONFIG_PATH="$auth_dir/basic_auth.ini"
(umask 077 && cat > "$MLFLOW_AUTH_CONFIG_PATH" <<INI
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = ${MLFLOW_AUTH_DATABASE_URI}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
grant_default_workspace_access = false
auth_cache_ttl_seconds = ${MLFLOW_AUTH_CACHE_TTL_S:-60}
INI
)

# One uvicorn worker and no job-execution workers (huey consumers): a handful of processes, not dozens.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false

# The server app: MLflow's basic auth with every page in the training view (nfnet-lab-auth, from
# studies/training/mlflow_app.py; MLflow's UI otherwise opens a fresh browser's first click in its GenAI view).
# Where the project is not installed (MLflow's own image), NFNET_LAB_MLFLOW_APP names that one file: it is
# installed on its own (MLflow and Flask are all it needs). MLFLOW_APP_NAME=basic-auth serves MLflow's UI as it is.
if [ -n "${NFNET_LAB_MLFLOW_APP:-}" ]; then
    pkg="$(mktemp -d -t nfnet-lab-mlflow-app.XXXXXX)"
    cp "$NFNET_LAB_MLFLOW_APP" "$pkg/nfnet_lab_mlflow_app.py"
    cat > "$pkg/pyproject.toml" <<TOML
[project]
name = "nfnet-lab-mlflow-app"
version = "0"
[project.entry-points."mlflow.app"]
nfnet-lab = "nfnet_lab_mlflow_app:create_app"
nfnet-lab-auth = "nfnet_lab_mlflow_app:create_auth_app"
[tool.setuptools]
py-modules = ["nfnet_lab_mlflow_app"]
TOML
    "${MLFLOW_PIP:-pip}" install --no-cache-dir -q --no-deps "$pkg"
fi
app="${MLFLOW_APP_NAME:-nfnet-lab-auth}"

args=(--app-name "$app" --host "$host" --port "$port" --workers 1
      --backend-store-uri "$MLFLOW_BACKEND_STORE_URI"
      --serve-artifacts --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION")
if [ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]; then
    args+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
fi
exec "${MLFLOW_BIN:-mlflow}" server "${args[@]}" "$@"
