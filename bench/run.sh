#!/usr/bin/env bash
# One command for the benchmark: installs nginx, wrk and redis-server when missing, builds in
# release mode, then runs every scenario and writes bench/results.json (see README, Performance).
# Options are passed to the driver: --users N (default 10000), --seconds S, --connections C,
# --rounds R.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
for pkg_bin in "nginx:nginx" "wrk:wrk" "redis-server:redis-server"; do
  pkg=${pkg_bin%%:*}; bin=${pkg_bin##*:}
  command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi
cargo build --release --quiet -p gatehouse-gateway -p gatehouse-tests --bins
exec ./target/release/gatehouse-bench "$@"
