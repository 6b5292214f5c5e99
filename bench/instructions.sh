#!/usr/bin/env bash
# User-space instructions per proxied request, counted by callgrind: the bare hyper proxy
# (gatehouse-bare-proxy), gatehouse embedded and gatehouse with Redis. Counts move about ±1%
# between runs (nine embedded counts: 44.6k-45.4k; Redis more, with how requests batch), so a
# change of a few percent shows where req/s on a shared VM moves ±20%; compare several
# alternating runs (GATEWAY= below) for anything smaller.
# Valgrind runs each program on one thread at about 1/50 speed; the load is 4 connections.
# Valgrind's CPU has no SHA extensions, so the token's SHA-256 takes sha2's software path here
# (about 3,500 instructions; with SHA-NI it is a few hundred).
# Options (environment): SECONDS_MEASURED (default 5), TOP (functions listed, default 25),
# GATEWAY (another gatehouse-gateway binary to count, e.g. a copy built from an older commit).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/need.sh valgrind:valgrind wrk:wrk redis-server:redis-server python3:python3
# Separately, as bench/run.sh builds them (one build would unify dependency features).
cargo build --release --quiet -p gatehouse-gateway --bin gatehouse-gateway
cargo build --release --quiet -p gatehouse-tests --bins
BIN=$PWD/target/release
GW=${GATEWAY:-$BIN/gatehouse-gateway}
OUT=$(mktemp -d)
SECS=${SECONDS_MEASURED:-5}
pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 300); do curl -s -o /dev/null "$1" && return 0; sleep 0.2; done; echo "no answer from $1" >&2; return 1; }

UP=$(free_port)
"$BIN/gatehouse-upstream" "127.0.0.1:$UP" 2>/dev/null & pids+=($!)
RP=$(free_port)
redis-server --port "$RP" --save "" --appendonly no --daemonize no >/dev/null & pids+=($!)
mkdir -p "$OUT/m"
# The full benchmark's manifests: client svc-api on /api, a plan that never refuses.
"$BIN/gatehouse-bench" --print-manifests "$UP" > "$OUT/m/bench.yaml"
wait_http "http://127.0.0.1:$UP/"

# measure NAME URL TOKENFILE -- CMD...: callgrind over SECS seconds of wrk load after 2 s of warm-up.
measure() {
  local name=$1 url=$2 tokens=$3; shift 4
  valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$OUT/$name.out" "$@" \
    >"$OUT/$name.log" 2>&1 &
  local vg=$!
  pids+=($vg)
  if [ -n "${READY:-}" ]; then wait_http "$READY"; fi
  if [ -n "${TOKEN_URL:-}" ]; then
    curl -sf -u svc-api:bench-secret-0123456789abcdef0123 -d grant_type=client_credentials \
      "$TOKEN_URL" | python3 -c 'import sys,json;print(json.load(sys.stdin)["access_token"])' >"$tokens"
  else
    sleep 3
  fi
  callgrind_control -i on "$vg" >/dev/null 2>&1
  TOKENS=$tokens wrk -t 1 -c 4 -d 2s -s bench/wrk.lua "$url" >/dev/null
  callgrind_control -z "$vg" >/dev/null 2>&1
  local n
  n=$(TOKENS=$tokens wrk -t 1 -c 4 -d "${SECS}s" -s bench/wrk.lua "$url" | awk '/requests in/ {print $1}')
  callgrind_control -d "$vg" >/dev/null 2>&1
  sleep 1
  { kill -9 "$vg" && wait "$vg"; } 2>/dev/null || true
  local f total
  f=$(ls -t "$OUT/$name.out"* | head -1)
  total=$(awk '/^(summary|totals):/ {t=$2} END {print t}' "$f")
  printf '%-22s %8d requests  %7d instructions per request\n' "$name" "$n" $((total / n))
  if [ "${TOP:-25}" -gt 0 ]; then
    callgrind_annotate --inclusive=yes "$f" 2>/dev/null |
      awk -v n="$n" -v top="${TOP:-25}" '/\?\?\?:|\.S:|\.c:/ && c < top {v=$1; gsub(",","",v); sub(/^[^:]*:/, "", $0); printf "    %7d  %s\n", v/n, substr($0, 1, 110); c++}' |
      grep -v "Scoped<T>::set\|block_on\|enter_runtime\|run_task\|Harness\|core::Core\|raw::poll\|backtrace\|thread_start\|start_thread\|clone3\|call_once" || true
  fi
}

touch "$OUT/none"
BP=$(free_port)
READY="" TOKEN_URL="" measure bare-proxy "http://127.0.0.1:$BP/api/x" "$OUT/none" -- \
  "$BIN/gatehouse-bare-proxy" "127.0.0.1:$BP" "127.0.0.1:$UP" 2

GP=$(free_port); AP=$(free_port)
GATEHOUSE_LOG=warn READY="http://127.0.0.1:$AP/readyz" TOKEN_URL="http://127.0.0.1:$GP/oauth2/token" \
  measure gatehouse-embedded "http://127.0.0.1:$GP/api/x" "$OUT/tok-emb" -- \
  "$GW" --manifests "$OUT/m" --listen "127.0.0.1:$GP" \
  --admin-listen "127.0.0.1:$AP" --data-dir "$OUT/data"

GP=$(free_port); AP=$(free_port)
GATEHOUSE_LOG=warn READY="http://127.0.0.1:$AP/readyz" TOKEN_URL="http://127.0.0.1:$GP/oauth2/token" \
  measure gatehouse-redis "http://127.0.0.1:$GP/api/x" "$OUT/tok-redis" -- \
  "$GW" --manifests "$OUT/m" --listen "127.0.0.1:$GP" \
  --admin-listen "127.0.0.1:$AP" --redis "redis://127.0.0.1:$RP/"
echo "callgrind files: $OUT"
