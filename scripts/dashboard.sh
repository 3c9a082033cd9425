#!/usr/bin/env bash
# The picture of the operators' dashboard (not part of the test suite): runs the demo chain in real
# Envoy with two minutes of traffic (a flood, a retry storm, a looping user, a credential leak,
# Redis down), scrapes /stats/prometheus every two seconds, and draws the panels of
# docs/dashboard/firebreak.json from the scrapes into docs/dashboard/panels.png (matplotlib, pinned
# in bench/requirements.txt, installed into .venv).
#   bash scripts/dashboard.sh [--native] [--duration S] [--scrapes FILE] [--out PNG]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

bash scripts/setup.sh
stamp=".venv/.firebreak-bench-requirements"
if ! cmp -s bench/requirements.txt "$stamp" 2>/dev/null; then
  echo "dashboard: installing bench/requirements.txt into .venv"
  .venv/bin/pip install --quiet --disable-pip-version-check -r bench/requirements.txt
  cp bench/requirements.txt "$stamp"
fi
bash scripts/build.sh
.venv/bin/python scripts/dashboard.py "$@"
