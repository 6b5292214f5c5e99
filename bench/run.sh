#!/usr/bin/env bash
# One command for the benchmark: installs nginx, wrk, redis-server (and make, gcc) when missing, builds in
# release mode, then runs every scenario and writes bench/results.json (see README, Performance).
# Options are passed to the driver: --users N (default 10000), --seconds S, --warmup S, --connections C,
# --rounds R.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/need.sh make:make gcc:cc nginx:nginx wrk:wrk redis-server:redis-server
cargo build --release --quiet -p gatehouse-gateway -p gatehouse-tests --bins
exec ./target/release/gatehouse-bench "$@"
