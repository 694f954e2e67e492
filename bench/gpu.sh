#!/usr/bin/env bash
# One GPU benchmark, unattended, on a bare machine after the README install (random weights, no downloads):
#   bash bench/gpu.sh [OUT.json] [more bench/gpu.py options]      # default OUT: bench_gpu.json
# Writes one JSON (see bench/gpu.py's docstring for its sections) in under 8 minutes on one H100/H200-class GPU:
# the sections share a 440 s budget, each in its own process with a hard limit, and `timeout` below is the last guard
# (the JSON is rewritten after every section, so whatever was measured stays).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench_gpu.json}
shift || true
exec timeout --kill-after=5 475 python bench/gpu.py --out "$out" "$@"
