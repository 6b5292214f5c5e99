#!/usr/bin/env bash
# Runs the whole test suite on a fresh Debian/Ubuntu machine: installs the system packages the
# tests start (when missing), then `cargo test` for the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

# make and gcc build jemalloc (the gateway's allocator) from source. chromium and
# chromium-driver (chromedriver) are for the headless browser test (tests/tests/browser.rs); no
# tool downloads a browser of its own.
scripts/need.sh make:make gcc:cc redis-server:redis-server chromium:chromium \
  chromium-driver:chromedriver openssl:openssl

# A real kube-apiserver, etcd, kube-controller-manager, kubectl and helm for the operator and
# chart tests, built from their Go modules once per machine (cached outside the repo; the first
# build takes 10-20 minutes on 2 cores). Without Go: `cargo test --workspace -- --skip kube_`.
if command -v go >/dev/null 2>&1; then
  bash scripts/kube-tools.sh
else
  echo "go is not installed: the kube_* tests will fail; install Go >= 1.24 or skip them with -- --skip kube_" >&2
fi

cargo test --workspace --locked "$@"
