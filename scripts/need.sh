#!/usr/bin/env bash
# Installs the Debian packages whose command is missing. Arguments: package:command pairs,
# e.g. `scripts/need.sh make:make gcc:cc`. Uses sudo when not root.
set -euo pipefail
missing=()
for pkg_bin in "$@"; do
  pkg=${pkg_bin%%:*}; bin=${pkg_bin##*:}
  # nginx and friends live in /usr/sbin, which is not on every user's PATH.
  command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing: ${missing[*]}"
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
