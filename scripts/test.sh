#!/usr/bin/env bash
# Runs the whole test suite on a fresh Debian/Ubuntu machine: installs the system packages the
# tests start (when missing), then `cargo test` for the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian package:command pairs. chromium and chromium-driver (chromedriver) are for the headless
# browser test (tests/tests/browser.rs); no tool downloads a browser of its own.
missing=()
for pkg_bin in "redis-server:redis-server" "chromium:chromium" "chromium-driver:chromedriver"; do
  pkg=${pkg_bin%%:*}; bin=${pkg_bin##*:}
  command -v "$bin" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing test dependencies: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi

cargo test --workspace --locked "$@"
