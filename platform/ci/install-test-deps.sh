#!/usr/bin/env bash
# System packages for the platform tests (tests/test_cluster.py needs PostgreSQL, tests/test_mlflow_ui.py
# headless Chromium). Idempotent: exits at once, silently, when both are already there. Needs root (or sudo)
# only when something is missing; without either it says what to install and exits 0, and the tests skip.
set -euo pipefail

have_postgres() {
    command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null
}
have_chromium() {
    command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1
}

pkgs=()
have_postgres || pkgs+=(postgresql)
have_chromium || pkgs+=(chromium)
[ ${#pkgs[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
    sudo=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo=(sudo -n)
else
    echo "install-test-deps: missing ${pkgs[*]}; install them (apt-get install ${pkgs[*]}) or the tests" \
         "that need them are skipped" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-test-deps: no apt-get here; install ${pkgs[*]} with your package manager" >&2
    exit 0
fi

echo "install-test-deps: installing ${pkgs[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
