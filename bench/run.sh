#!/usr/bin/env bash
# One command for the benchmark: installs nginx, wrk, redis-server (and make, gcc) when missing, builds in
# release mode, builds the gateway with profile-guided optimization as the Dockerfile ships it
# (scripts/pgo-build.sh), then runs every scenario and writes bench/results.json (see README,
# Performance). The plain release build is measured too, with one token in both modes.
# Options are passed to the driver: --users N (default 10000), --seconds S, --warmup S,
# --connections C, --rounds R (--gateway and --plain-gateway are set here). PGO=0 measures the
# plain build alone (no PGO build, faster).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/need.sh make:make gcc:cc nginx:nginx wrk:wrk redis-server:redis-server
export CARGO_TARGET_DIR=$PWD/target
# The gateway on its own, as scripts/pgo-build.sh and Dockerfile.gateway build it: built with
# the test crates, dependencies would get their features too.
cargo build --release --quiet -p gatehouse-gateway --bin gatehouse-gateway
cargo build --release --quiet -p gatehouse-tests --bins
if [ "${PGO:-1}" = 0 ]; then
  exec ./target/release/gatehouse-bench "$@"
fi
if ! scripts/pgo-build.sh; then
  echo "bench/run.sh: the PGO build failed (above); measuring the plain build alone" >&2
  exec ./target/release/gatehouse-bench "$@"
fi
exec ./target/release/gatehouse-bench --gateway target/pgo/gatehouse-gateway \
  --plain-gateway target/release/gatehouse-gateway "$@"
