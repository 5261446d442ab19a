#!/usr/bin/env bash
# Start a Ray head with token authentication on and the dashboard + job server on loopback.
# Extra arguments go to `ray start` (e.g. --block, --num-cpus 8, --num-gpus 1).
#   RAY_DASHBOARD_HOST   where the dashboard + job server listen (default 127.0.0.1)
#   RAY_DASHBOARD_PORT   job server port (default 8265)
#   RAY_HEAD_IP          the address other nodes use to reach this head (default: Ray picks the node's IP)
#   RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH   the token (default file ~/.ray/auth_token, created if missing)
set -euo pipefail

dash_host="${RAY_DASHBOARD_HOST:-127.0.0.1}"
dash_port="${RAY_DASHBOARD_PORT:-8265}"

# Ray 2.60's `ray start` turns auth on only when it finds a token or RAY_AUTH_MODE=token, and with the mode set
# but no token it refuses to start (it never generates one). So: make sure a token exists, then force the mode.
if [ -z "${RAY_AUTH_TOKEN:-}" ]; then
    token_file="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
    if [ ! -s "$token_file" ]; then
        mkdir -p "$(dirname "$token_file")"
        (umask 077 && python3 -c 'import secrets; print(secrets.token_hex(32), end="")' > "$token_file")
        echo "start-head: wrote a new Ray auth token to $token_file" >&2
    fi
fi
export RAY_AUTH_MODE=token
export RAY_USAGE_STATS_ENABLED=0

ip_args=()
if [ -n "${RAY_HEAD_IP:-}" ]; then
    ip_args=(--node-ip-address "$RAY_HEAD_IP")
fi
exec ray start --head "${ip_args[@]}" --include-dashboard true --dashboard-host "$dash_host" \
    --dashboard-port "$dash_port" --disable-usage-stats "$@"
