#!/usr/bin/env bash
# Builds, once per machine, the Kubernetes binaries that the tests against a real API server use,
# from their Go modules (there is no Docker here, so no kind and no release tarballs):
#
#   kube-apiserver, kube-controller-manager, kubectl   k8s.io/kubernetes  $KUBE_VERSION
#   etcd                                               go.etcd.io/etcd/server/v3  $ETCD_VERSION
#   helm                                               helm.sh/helm/v3  $HELM_VERSION
#
# They go to ${GATEHOUSE_TOOLS_DIR:-$HOME/.cache/gatehouse-tools}/$KUBE_VERSION/, never into the
# repo. Running it again is a no-op once everything is built (a stamp per binary records the
# version it was built from). Needs Go >= 1.24 and the Go module proxy; nothing else.
#
# Why a scratch module: k8s.io/kubernetes's go.mod points its staging modules (k8s.io/api,
# apiserver, client-go, ...) at ./staging/src/..., so `go install k8s.io/kubernetes/cmd/...@v`
# refuses. Kubernetes v1.N.P publishes each staging module as v0.N.P, so a module that requires
# k8s.io/kubernetes v1.N.P and replaces every staging module by its v0.N.P release builds the
# commands with the ordinary toolchain. etcd's server module has the same kind of local replace
# lines (../api, ../raft, ...), handled the same way. Helm's go.mod has none: plain `go install`.
#
# etcd: Debian's etcd-server is 3.4.23; Kubernetes 1.33's own test harness (hack/lib/etcd.sh)
# requires etcd >= 3.5.24, and 3.5 is what it is released and tested with, so etcd is built too.
#
# Usage: scripts/kube-tools.sh            build what is missing, print the directory
#        scripts/kube-tools.sh --print-dir   only print the directory (exit 1 when incomplete)
# Env:   GATEHOUSE_TOOLS_DIR (cache root), GATEHOUSE_TOOLS_JOBS (parallel compiles, default 2)
set -euo pipefail

# Keep KUBE_VERSION in sync with KUBE_VERSION in tests/src/kube.rs (a unit test checks it).
KUBE_VERSION=v1.33.13
ETCD_VERSION=v3.5.24
HELM_VERSION=v3.18.6

TOOLS_ROOT=${GATEHOUSE_TOOLS_DIR:-$HOME/.cache/gatehouse-tools}
OUT=$TOOLS_ROOT/$KUBE_VERSION
JOBS=${GATEHOUSE_TOOLS_JOBS:-2}
BINARIES=(kube-apiserver kube-controller-manager kubectl etcd helm)

die() {
  echo "kube-tools: error: $*" >&2
  exit 1
}
log() { echo "kube-tools: $*" >&2; }

stamp_of() {
  case $1 in
    etcd) echo "etcd $ETCD_VERSION" ;;
    helm) echo "helm $HELM_VERSION" ;;
    *) echo "$1 $KUBE_VERSION" ;;
  esac
}

is_built() {
  [ -x "$OUT/$1" ] && [ "$(cat "$OUT/.stamp-$1" 2>/dev/null)" = "$(stamp_of "$1")" ]
}

all_built() {
  local b
  for b in "${BINARIES[@]}"; do is_built "$b" || return 1; done
}

if [ "${1:-}" = "--print-dir" ]; then
  all_built || { echo "kube-tools: not built yet in $OUT; run scripts/kube-tools.sh" >&2; exit 1; }
  echo "$OUT"
  exit 0
elif [ $# -gt 0 ]; then
  die "unknown argument '$1' (usage: scripts/kube-tools.sh [--print-dir])"
fi

if all_built; then
  log "all binaries present (Kubernetes $KUBE_VERSION, etcd $ETCD_VERSION, helm $HELM_VERSION)"
  echo "$OUT"
  exit 0
fi

command -v go >/dev/null 2>&1 || die "the Go toolchain (go >= 1.24) is needed to build the Kubernetes test binaries; install it and run again"
go_version=$(go env GOVERSION) # e.g. go1.26.8
go_minor=$(echo "$go_version" | sed -E 's/^go1\.([0-9]+).*/\1/')
if ! [[ $go_minor =~ ^[0-9]+$ ]] || [ "$go_minor" -lt 24 ]; then
  die "Kubernetes $KUBE_VERSION needs Go >= 1.24, found $go_version"
fi

mkdir -p "$OUT"
# One builder at a time per cache (parallel test runs or CI jobs on the same machine).
exec 9>"$TOOLS_ROOT/.lock"
if command -v flock >/dev/null 2>&1; then
  flock 9 || die "could not lock $TOOLS_ROOT/.lock"
fi

# Never fetch a toolchain; use what is installed. Compile parallelism bounded (2-core machines).
export GOTOOLCHAIN=local
export GOFLAGS="${GOFLAGS:-} -mod=mod"
export CGO_ENABLED=0

times_file=$OUT/build-times.txt

# build NAME MODULE_DIR PACKAGE LDFLAGS
build() {
  local name=$1 dir=$2 pkg=$3 ldflags=$4
  if is_built "$name"; then
    log "$name: already built ($(stamp_of "$name"))"
    return 0
  fi
  log "$name: building $pkg ($(stamp_of "$name")) with $go_version, -p $JOBS; this takes minutes"
  local start=$SECONDS
  rm -f "$OUT/.stamp-$name" "$OUT/.$name.tmp"
  if ! (cd "$dir" && go build -p "$JOBS" -trimpath -ldflags "$ldflags" -o "$OUT/.$name.tmp" "$pkg") \
    >"$OUT/$name.build.log" 2>&1; then
    tail -n 40 "$OUT/$name.build.log" >&2
    die "building $name failed (full log: $OUT/$name.build.log)"
  fi
  mv -f "$OUT/.$name.tmp" "$OUT/$name"
  stamp_of "$name" >"$OUT/.stamp-$name"
  local took=$((SECONDS - start))
  echo "$name $(stamp_of "$name" | cut -d' ' -f2) ${took}s $(date -u +%Y-%m-%dT%H:%M:%SZ)" >>"$times_file"
  log "$name: built in ${took}s"
}

# --- Kubernetes: scratch module with a replace per staging module -------------------------------
kube_minor_patch=${KUBE_VERSION#v1.} # 33.13
staging_version=v0.$kube_minor_patch
kube_src=$OUT/src/kubernetes
if ! is_built kube-apiserver || ! is_built kube-controller-manager || ! is_built kubectl; then
  mkdir -p "$kube_src"
  log "downloading k8s.io/kubernetes@$KUBE_VERSION (module proxy)"
  kube_mod=$(cd "$kube_src" && go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" |
    sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
  [ -f "$kube_mod" ] || die "could not download k8s.io/kubernetes@$KUBE_VERSION from the Go module proxy"
  # Staging modules are the local replaces: `k8s.io/api => ./staging/src/k8s.io/api`.
  mapfile -t staging < <(sed -nE 's#^[[:space:]]*(k8s\.io/[A-Za-z0-9._/-]+)[[:space:]]+=>[[:space:]]+\./staging/.*#\1#p' "$kube_mod")
  [ ${#staging[@]} -gt 10 ] || die "found no staging replace lines in $kube_mod"
  {
    echo "// Generated by gatehouse scripts/kube-tools.sh; builds Kubernetes commands outside their repo."
    echo "module gatehouse.local/kube-tools"
    echo
    echo "go 1.24.0"
    echo
    echo "godebug default=go1.24"
    echo
    echo "require k8s.io/kubernetes $KUBE_VERSION"
    echo
    echo "replace ("
    for m in "${staging[@]}"; do echo "	$m => $m $staging_version"; done
    echo ")"
  } >"$kube_src/go.mod.new"
  if ! cmp -s "$kube_src/go.mod.new" "$kube_src/go.mod.in" 2>/dev/null; then
    cp "$kube_src/go.mod.new" "$kube_src/go.mod"
    cp "$kube_src/go.mod.new" "$kube_src/go.mod.in"
    rm -f "$kube_src/go.sum"
  fi
  rm -f "$kube_src/go.mod.new"
  log "Kubernetes $KUBE_VERSION: ${#staging[@]} staging modules replaced by their $staging_version releases"

  build_date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  kube_ldflags="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    kube_ldflags+=" -X $p.gitVersion=$KUBE_VERSION -X $p.gitMajor=1 -X $p.gitMinor=${kube_minor_patch%%.*}"
    kube_ldflags+=" -X $p.gitTreeState=clean -X $p.buildDate=$build_date"
  done
  build kube-apiserver "$kube_src" k8s.io/kubernetes/cmd/kube-apiserver "$kube_ldflags"
  build kube-controller-manager "$kube_src" k8s.io/kubernetes/cmd/kube-controller-manager "$kube_ldflags"
  build kubectl "$kube_src" k8s.io/kubernetes/cmd/kubectl "$kube_ldflags"
fi

# --- etcd: scratch module replacing etcd's ../api, ../raft, ... by their released versions ------
etcd_src=$OUT/src/etcd
if ! is_built etcd; then
  mkdir -p "$etcd_src"
  log "downloading go.etcd.io/etcd/server/v3@$ETCD_VERSION (module proxy)"
  etcd_mod=$(cd "$etcd_src" && go mod download -json "go.etcd.io/etcd/server/v3@$ETCD_VERSION" |
    sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
  [ -f "$etcd_mod" ] || die "could not download go.etcd.io/etcd/server/v3@$ETCD_VERSION from the Go module proxy"
  {
    echo "// Generated by gatehouse scripts/kube-tools.sh; builds etcd outside its repo."
    echo "module gatehouse.local/etcd-tools"
    echo
    echo "go 1.24"
    echo
    echo "require go.etcd.io/etcd/server/v3 $ETCD_VERSION"
    echo
    echo "replace ("
    # `go.etcd.io/etcd/api/v3 => ../api`: use the version that etcd's go.mod requires.
    sed -nE 's#^[[:space:]]*(go\.etcd\.io/etcd/[A-Za-z0-9./-]+)[[:space:]]+=>[[:space:]]+\.\./.*#\1#p' "$etcd_mod" |
      while read -r m; do
        v=$(sed -nE "s#^[[:space:]]*${m//./\\.}[[:space:]]+(v[^ ]+).*#\\1#p" "$etcd_mod" | head -n1)
        [ -n "$v" ] || v=$ETCD_VERSION
        echo "	$m => $m $v"
      done
    echo ")"
  } >"$etcd_src/go.mod.new"
  if ! cmp -s "$etcd_src/go.mod.new" "$etcd_src/go.mod.in" 2>/dev/null; then
    cp "$etcd_src/go.mod.new" "$etcd_src/go.mod"
    cp "$etcd_src/go.mod.new" "$etcd_src/go.mod.in"
    rm -f "$etcd_src/go.sum"
  fi
  rm -f "$etcd_src/go.mod.new"
  build etcd "$etcd_src" go.etcd.io/etcd/server/v3 "-s -w"
fi

# --- helm: its go.mod has no local replace lines, so an ordinary module build -------------------
helm_src=$OUT/src/helm
if ! is_built helm; then
  mkdir -p "$helm_src"
  cat >"$helm_src/go.mod" <<EOF
// Generated by gatehouse scripts/kube-tools.sh.
module gatehouse.local/helm-tools

go 1.24.0

require helm.sh/helm/v3 $HELM_VERSION
EOF
  helm_ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  # Helm $HELM_VERSION is built against client-go v0.33: default capabilities Kubernetes 1.33.
  for p in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
    helm_ldflags+=" -X $p.k8sVersionMajor=1 -X $p.k8sVersionMinor=33"
  done
  build helm "$helm_src" helm.sh/helm/v3/cmd/helm "$helm_ldflags"
fi

all_built || die "some binaries are missing in $OUT after the build"
for b in "${BINARIES[@]}"; do
  log "$(printf '%-24s' "$b") $OUT/$b ($(stamp_of "$b"))"
done
log "cache size: $(du -sh "$OUT" | cut -f1) in $OUT"
echo "$OUT"
