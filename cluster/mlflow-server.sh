#!/usr/bin/env bash
# An MLflow tracking server for lesa runs: metadata in a SQL database, artifacts (config,
# metrics.json, per-label reports, model.pt) proxied by the server into an object store, so the
# Ray workers and the driver need only MLFLOW_TRACKING_URI=http://HOST:PORT, no storage
# credentials.
#
#   cluster/mlflow-server.sh [EXTRA mlflow server ARGS...]
#
# Every setting comes from the environment (for the store URIs, the names `mlflow server` reads):
#   MLFLOW_DATA_DIR                 default ${XDG_DATA_HOME:-~/.local/share}/lesa/mlflow
#   MLFLOW_BACKEND_STORE_URI        default sqlite:///$MLFLOW_DATA_DIR/mlflow.db
#                                   a team server: postgresql://USER@DBHOST:5432/mlflow (the password
#                                   from ~/.pgpass or PGPASSWORD, never in this file; needs psycopg2)
#   MLFLOW_ARTIFACTS_DESTINATION    default $MLFLOW_DATA_DIR/artifacts
#                                   an object store: s3://BUCKET/mlflow (credentials from the usual AWS
#                                   chain: instance profile, AWS_PROFILE, ...; needs boto3),
#                                   gs://BUCKET/mlflow (needs google-cloud-storage)
#   MLFLOW_HOST                     default 127.0.0.1 (loopback only; see "Exposing it" below)
#   MLFLOW_PORT                     default 5000
#   MLFLOW_WORKERS                  default 1
#   MLFLOW_APP_NAME=basic-auth      turn on MLflow's own user/password auth (see below)
#   LESA_MLFLOW_BIN                 the mlflow executable (default .venv/bin/mlflow, else mlflow on PATH)
#
# Then, on this machine:   export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
# and `lesa train` / `ray job submit ... -- lesa train` log there (trainer/tracking.py reads it).
#
# Exposing it (the server has no authentication of its own unless basic-auth is on):
#   - Best: keep MLFLOW_HOST=127.0.0.1 and reach it through an SSH tunnel,
#       ssh -N -L 5000:127.0.0.1:5000 user@mlflow-host      # then open http://127.0.0.1:5000
#   - On a Ray cluster the driver and rank 0 (on a GPU node) both log, so the server must be
#     reachable from the nodes: bind it to a private address inside the cluster's network
#     (MLFLOW_HOST=<the head's private IP>: the launcher's security group admits only the cluster's
#     own nodes besides SSH; on Kubernetes a ClusterIP Service), never 0.0.0.0 on a public
#     address, and still reach the UI from your laptop through an SSH tunnel or port-forward.
#   - A shared server: bind to 127.0.0.1 and put a reverse proxy with TLS and authentication in
#     front (nginx/Caddy with basic auth or an OAuth2 proxy), and pass the proxy's host name with
#     --allowed-hosts mlflow.example.com (MLflow rejects other Host headers: DNS rebinding guard).
#   - MLflow's own auth: MLFLOW_APP_NAME=basic-auth (needs `pip install mlflow[auth]`, i.e.
#     Flask-WTF). This script then writes $MLFLOW_DATA_DIR/basic_auth.ini (users in
#     $MLFLOW_DATA_DIR/basic_auth.db) unless MLFLOW_AUTH_CONFIG_PATH names one, and needs
#     MLFLOW_FLASK_SERVER_SECRET_KEY (a random string) and, on the first start only,
#     MLFLOW_AUTH_ADMIN_PASSWORD. Clients then set MLFLOW_TRACKING_USERNAME and
#     MLFLOW_TRACKING_PASSWORD. Basic auth sends the password in clear: use it behind TLS.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
if [[ -n "${LESA_MLFLOW_BIN:-}" ]]; then  # another mlflow executable (the tests use a stand-in)
    MLFLOW=$LESA_MLFLOW_BIN
    PY=$(command -v python3 || command -v python)
elif [[ -x "$REPO/.venv/bin/mlflow" ]]; then
    MLFLOW="$REPO/.venv/bin/mlflow"
    PY="$REPO/.venv/bin/python"
else
    MLFLOW=$(command -v mlflow) || { echo "mlflow-server: no .venv/bin/mlflow and no mlflow on PATH" >&2; exit 1; }
    PY=$(command -v python3 || command -v python)
fi

export MLFLOW_DISABLE_TELEMETRY=true
DATA=${MLFLOW_DATA_DIR:-${XDG_DATA_HOME:-$HOME/.local/share}/lesa/mlflow}
BACKEND=${MLFLOW_BACKEND_STORE_URI:-sqlite:///$DATA/mlflow.db}
ARTIFACTS=${MLFLOW_ARTIFACTS_DESTINATION:-$DATA/artifacts}
HOST=${MLFLOW_HOST:-127.0.0.1}
PORT=${MLFLOW_PORT:-5000}
WORKERS=${MLFLOW_WORKERS:-1}

mkdir -p "$DATA"
[[ "$ARTIFACTS" == *://* ]] || mkdir -p "$ARTIFACTS"

app=()
if [[ -n "${MLFLOW_APP_NAME:-}" ]]; then
    [[ "$MLFLOW_APP_NAME" == basic-auth ]] || { echo "mlflow-server: MLFLOW_APP_NAME: only basic-auth is known" >&2; exit 2; }
    "$PY" -c 'import flask_wtf' 2>/dev/null \
        || { echo "mlflow-server: basic-auth needs Flask-WTF: pip install 'mlflow[auth]==3.17.2'" >&2; exit 2; }
    [[ -n "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]] \
        || { echo "mlflow-server: basic-auth needs MLFLOW_FLASK_SERVER_SECRET_KEY (a long random string)" >&2; exit 2; }
    if [[ -z "${MLFLOW_AUTH_CONFIG_PATH:-}" ]]; then
        export MLFLOW_AUTH_CONFIG_PATH="$DATA/basic_auth.ini"
        if [[ ! -f "$MLFLOW_AUTH_CONFIG_PATH" ]]; then
            cat >"$MLFLOW_AUTH_CONFIG_PATH" <<EOF
[mlflow]
default_permission = READ
database_uri = sqlite:///$DATA/basic_auth.db
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
        fi
    fi
    app=(--app-name basic-auth)
fi

case "$HOST" in
    127.0.0.1|localhost|::1) ;;
    *) echo "mlflow-server: WARNING: binding to $HOST: anyone who reaches that address can read and" \
            "write every run unless basic-auth or an authenticating proxy is in front; pass" \
            "--allowed-hosts with the name clients use" >&2 ;;
esac

echo "mlflow-server: backend $BACKEND, artifacts $ARTIFACTS, http://$HOST:$PORT" >&2
exec "$MLFLOW" server \
    --backend-store-uri "$BACKEND" \
    --artifacts-destination "$ARTIFACTS" \
    --host "$HOST" --port "$PORT" --workers "$WORKERS" \
    "${app[@]}" "$@"
