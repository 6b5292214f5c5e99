#!/usr/bin/env bash
# Builds the gateway with profile-guided optimization (PGO) into target/pgo/gatehouse-gateway:
#   1. an instrumented release build (target/pgo/gen);
#   2. training: a short run of the benchmark driver against it (signups, logins, the token
#      endpoint, proxying in both store modes with 1 and 200 users, the 429 path, moderate load),
#      after which each gateway exits on SIGTERM and writes its profile;
#   3. the release build again, optimized with the merged profile (target/pgo/use).
# The proxy path then runs with its hot code laid out together and its branches ordered by
# what production-like traffic does (README, Performance: about 15% less CPU per request).
# Needs what bench/run.sh needs (installed when missing) and rustup's llvm-tools component
# (added when missing). About 17 minutes on 2 cores from scratch; the Dockerfile runs it too.
set -euo pipefail
cd "$(dirname "$0")/.."
# The paths below are ./target's; CARGO_ENCODED_RUSTFLAGS would take precedence over the
# RUSTFLAGS that make the two builds (and then the build would silently not be instrumented).
export CARGO_TARGET_DIR=$PWD/target
unset CARGO_ENCODED_RUSTFLAGS
scripts/need.sh make:make gcc:cc nginx:nginx wrk:wrk redis-server:redis-server

# The benchmark driver and its upstream, plain release builds.
cargo build --release --quiet --locked -p gatehouse-tests --bins

pgo=$PWD/target/pgo
mkdir -p "$pgo"
# Build scripts and proc macros are instrumented too and write profiles while compiling:
# those go to a directory that is not merged.
RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-Cprofile-generate=$pgo/build-profiles" \
  cargo build --release --quiet --locked -p gatehouse-gateway --bin gatehouse-gateway \
  --target-dir "$pgo/gen"

# Training is not deterministic, so each profile differs a little and rebuilds everything:
# keep the optimized binary while neither the instrumented one (the gateway's source) nor the
# training driver changed.
if [ "$pgo/gatehouse-gateway" -nt "$pgo/gen/release/gatehouse-gateway" ] &&
  [ "$pgo/gatehouse-gateway" -nt target/release/gatehouse-bench ]; then
  echo "pgo-build: $pgo/gatehouse-gateway is up to date" >&2
  exit 0
fi

# llvm-profdata of rustc's own LLVM (profile formats change between LLVM versions): rustup's
# llvm-tools component, added when missing, or the distribution's llvm-profdata-<major>.
host=$(rustc -vV | sed -n 's/^host: //p')
llvm_major=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
profdata="$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"
if [ ! -x "$profdata" ] && command -v rustup >/dev/null 2>&1; then
  rustup component add llvm-tools || true
fi
if [ ! -x "$profdata" ]; then
  profdata=$(command -v "llvm-profdata-$llvm_major" || true)
fi
if [ -z "$profdata" ]; then
  echo "pgo-build: no llvm-profdata for LLVM $llvm_major (rustup component add llvm-tools)" >&2
  exit 1
fi

rm -rf "$pgo/raw"
mkdir -p "$pgo/raw"
echo "pgo-build: training (about 2 minutes)" >&2
LLVM_PROFILE_FILE="$pgo/raw/%p-%m.profraw" ./target/release/gatehouse-bench \
  --gateway "$pgo/gen/release/gatehouse-gateway" \
  --users 200 --seconds 2 --warmup 1 --rounds 1 --memory-tokens 2000 \
  --out "$pgo/training.json" >"$pgo/training.log" 2>&1 ||
  { tail -20 "$pgo/training.log" >&2; echo "pgo-build: training failed" >&2; exit 1; }
# One profile per store mode: a gateway that had to be killed wrote none.
profiles=$(find "$pgo/raw" -name '*.profraw' | wc -l)
if [ "$profiles" -lt 2 ]; then
  echo "pgo-build: the two instrumented gateways wrote $profiles profiles" >&2
  exit 1
fi
"$profdata" merge -o "$pgo/merged.profdata" "$pgo/raw/"*.profraw
# Named by content: cargo sees a new RUSTFLAGS (and rebuilds) exactly when the profile changed.
sum=$(sha256sum "$pgo/merged.profdata" | cut -c1-16)
mv "$pgo/merged.profdata" "$pgo/gateway-$sum.profdata"
find "$pgo" -maxdepth 1 -name 'gateway-*.profdata' ! -name "gateway-$sum.profdata" -delete
RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-Cprofile-use=$pgo/gateway-$sum.profdata" \
  cargo build --release --quiet --locked -p gatehouse-gateway --bin gatehouse-gateway \
  --target-dir "$pgo/use"
cp "$pgo/use/release/gatehouse-gateway" "$pgo/gatehouse-gateway"
echo "pgo-build: $pgo/gatehouse-gateway" >&2
