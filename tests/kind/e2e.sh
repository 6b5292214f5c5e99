#!/usr/bin/env bash
# End-to-end on kind: create the cluster from kind-config.yaml, build and load the images,
# helm install the chart, apply examples/mobile with an in-cluster echo upstream, then run the
# mobile OAuth flow (authorization code + PKCE: authorize -> signup -> consent -> code -> token)
# with curl through the mapped port and check the identity headers and a 429.
#
#   tests/kind/e2e.sh                    # from anywhere; needs docker, kind, kubectl, helm, curl, openssl
#   KEEP_CLUSTER=0 tests/kind/e2e.sh     # delete the cluster at the end (default: keep it)
#   CLUSTER=mine TAG=test tests/kind/e2e.sh
#   PGO=0 tests/kind/e2e.sh              # plain gateway build (skips the ~17 min PGO build)
#
# An existing cluster with the same name is reused (its port mapping must be the one of
# kind-config.yaml: host 127.0.0.1:8080 -> node port 30080).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CLUSTER=${CLUSTER:-gatehouse}
CONTEXT="kind-${CLUSTER}"
TAG=${TAG:-dev}
NS=${NAMESPACE:-gatehouse-system}
RELEASE=gatehouse
GW=${GATEWAY_URL:-http://localhost:8080}
KEEP_CLUSTER=${KEEP_CLUSTER:-1}
CLIENT_ID=demo-app-mobile
REDIRECT_URI=http://127.0.0.1/callback
REDIRECT_URI_ENC=http%3A%2F%2F127.0.0.1%2Fcallback

say() { printf '\n==> %s\n' "$*"; }
fail() { printf '\nE2E FAILED: %s\n' "$*" >&2; exit 1; }

need() {
  if ! command -v "$1" >/dev/null 2>&1; then
    printf 'e2e: %s is required but was not found in PATH.\n  %s\n' "$1" "$2" >&2
    exit 1
  fi
}
need docker "Install Docker (https://docs.docker.com/get-docker/); kind runs its nodes as containers."
need kind "Install kind (https://kind.sigs.k8s.io/docs/user/quick-start/#installation), e.g. go install sigs.k8s.io/kind@latest"
need kubectl "Install kubectl (https://kubernetes.io/docs/tasks/tools/)."
need helm "Install helm 3 (https://helm.sh/docs/intro/install/)."
need curl "Install curl."
need openssl "Install openssl (used for the PKCE code_verifier/code_challenge)."
if ! docker info >/dev/null 2>&1; then
  printf 'e2e: docker is installed but its engine is not reachable (is the Docker daemon running, and may this user use it?).\n' >&2
  exit 1
fi

k() { kubectl --context "$CONTEXT" "$@"; }
WORK=$(mktemp -d)
JAR="$WORK/cookies"

on_exit() {
  status=$?
  if [ "$status" -ne 0 ]; then
    printf '\n----- diagnostics -----\n' >&2
    k get pods -A -o wide >&2 || true
    k -n "$NS" logs deployment/${RELEASE}-operator --tail=50 >&2 || true
    k -n "$NS" logs deployment/${RELEASE}-gateway --tail=50 >&2 || true
    k get subscriptions.gatehouse.dev -A -o wide >&2 || true
  fi
  rm -rf "$WORK"
  if [ "$KEEP_CLUSTER" = "0" ]; then
    kind delete cluster --name "$CLUSTER" || true
  else
    printf '\nThe cluster is kept (kubectl --context %s ...). Delete it with: kind delete cluster --name %s\n' "$CONTEXT" "$CLUSTER"
  fi
  exit "$status"
}
trap on_exit EXIT

# --- cluster ---------------------------------------------------------------------------------
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  say "reusing kind cluster $CLUSTER"
else
  say "creating kind cluster $CLUSTER from kind-config.yaml"
  kind create cluster --name "$CLUSTER" --config "$ROOT/kind-config.yaml" --wait 120s
fi

# --- images ----------------------------------------------------------------------------------
say "building images (first build compiles the workspace; takes a while)"
export DOCKER_BUILDKIT=1
for target in operator gateway echo; do
  docker build --target "$target" --build-arg PGO="${PGO:-1}" -t "gatehouse-${target}:${TAG}" "$ROOT"
done
say "loading images into kind"
kind load docker-image --name "$CLUSTER" \
  "gatehouse-operator:${TAG}" "gatehouse-gateway:${TAG}" "gatehouse-echo:${TAG}"

# --- chart -----------------------------------------------------------------------------------
say "helm install $RELEASE into $NS"
helm --kube-context "$CONTEXT" upgrade --install "$RELEASE" "$ROOT/charts/gatehouse" \
  --namespace "$NS" --create-namespace \
  --set image.registry= \
  --set image.tag="$TAG" \
  --set gateway.issuer="$GW" \
  --set gateway.service.type=NodePort \
  --set gateway.service.nodePort=30080 \
  --set gateway.autoscaling.enabled=false \
  --set gateway.replicas=2 \
  --set operator.replicas=2

# --- demo resources and the echo upstream ----------------------------------------------------
say "applying examples/mobile with the upstream at the in-cluster echo service"
k apply -f "$ROOT/examples/mobile/00-namespace.yaml"
k apply -f - <<YAML
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo, namespace: demo, labels: {app: echo}}
spec:
  replicas: 1
  selector: {matchLabels: {app: echo}}
  template:
    metadata: {labels: {app: echo}}
    spec:
      securityContext:
        runAsNonRoot: true
        runAsUser: 65532
        seccompProfile: {type: RuntimeDefault}
      containers:
        - name: echo
          image: gatehouse-echo:${TAG}
          imagePullPolicy: IfNotPresent
          args: ["--listen", "0.0.0.0:9001"]
          ports: [{name: http, containerPort: 9001}]
          readinessProbe: {tcpSocket: {port: http}, periodSeconds: 2}
          securityContext:
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            capabilities: {drop: [ALL]}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo}
spec:
  selector: {app: echo}
  ports: [{name: http, port: 9001, targetPort: http}]
YAML
for f in "$ROOT"/examples/mobile/*.yaml; do
  case "$(basename "$f")" in
    00-namespace.yaml) ;;
    api.yaml) sed 's#http://127.0.0.1:9001#http://echo.demo.svc.cluster.local:9001#' "$f" | k apply -f - ;;
    *) k apply -f "$f" ;;
  esac
done

say "waiting for the pods"
k -n "$NS" rollout status statefulset/${RELEASE}-redis --timeout=300s
k -n "$NS" rollout status deployment/${RELEASE}-operator --timeout=300s
k -n "$NS" rollout status deployment/${RELEASE}-gateway --timeout=300s
k -n demo rollout status deployment/echo --timeout=120s
k -n demo wait --for=jsonpath='{.status.phase}'=Active \
  subscriptions.gatehouse.dev/demo-app-mobile --timeout=120s

# --- the OAuth flow --------------------------------------------------------------------------
# The value of a hidden input on an HTML page: hidden PAGE NAME
hidden() { printf '%s' "$1" | sed -n "s/.*name=\"$2\" value=\"\([^\"]*\)\".*/\1/p" | head -n1; }
# One query parameter of a URL: param URL NAME
param() { printf '%s' "$1" | sed -n "s/.*[?&]$2=\([^&#]*\).*/\1/p" | head -n1; }
# POST a form without following the redirect; prints "STATUS LOCATION".
post_form() {
  local url=$1; shift
  local args=()
  for kv in "$@"; do args+=(--data-urlencode "$kv"); done
  curl -sS -b "$JAR" -c "$JAR" -o /dev/null -w '%{http_code} %{redirect_url}\n' "${args[@]}" "$url"
}

VERIFIER=$(openssl rand -base64 48 | tr -d '\n=' | tr '+/' '-_')
CHALLENGE=$(printf '%s' "$VERIFIER" | openssl dgst -binary -sha256 | openssl base64 -A | tr -d '=' | tr '+/' '-_')
STATE=$(openssl rand -hex 12)
EMAIL="e2e-$(date +%s)-$(openssl rand -hex 3)@example.com"
PASSWORD="kind-e2e-$(openssl rand -hex 8)-lantern-harbor"
AUTHORIZE="$GW/oauth2/authorize?response_type=code&client_id=$CLIENT_ID&redirect_uri=$REDIRECT_URI_ENC&scope=profile&state=$STATE&code_challenge=$CHALLENGE&code_challenge_method=S256"

say "waiting for the gateway at $GW to serve $CLIENT_ID"
for i in $(seq 1 60); do
  code=$(curl -s -o /dev/null -w '%{http_code}' -c "$JAR" -b "$JAR" "$AUTHORIZE" || true)
  [ "$code" = "200" ] && break
  [ "$i" = 60 ] && fail "GET /oauth2/authorize answered $code (want 200 with the sign-in page)"
  sleep 2
done
curl -fsS "$GW/.well-known/oauth-authorization-server" | grep -q "\"issuer\": *\"$GW\"" \
  || fail "metadata does not name issuer $GW"

say "authorize -> sign-in page"
PAGE=$(curl -fsS -b "$JAR" -c "$JAR" "$AUTHORIZE")
REQ=$(hidden "$PAGE" req)
[ -n "$REQ" ] || fail "no pending request id on the sign-in page"

say "signup"
PAGE=$(curl -fsS -b "$JAR" -c "$JAR" "$GW/signup?req=$REQ")
CSRF=$(hidden "$PAGE" csrf)
[ -n "$CSRF" ] || fail "no CSRF token on the signup page"
read -r STATUS LOCATION < <(post_form "$GW/signup" "email=$EMAIL" "password=$PASSWORD" "csrf=$CSRF" "req=$REQ")
[ "$STATUS" = "303" ] || fail "POST /signup answered $STATUS (want 303)"

if [ "${LOCATION#"$REDIRECT_URI"}" = "$LOCATION" ]; then
  say "consent"
  case "$LOCATION" in
    "$GW"/consent*) ;;
    *) fail "after signup: redirected to $LOCATION (want the consent page)" ;;
  esac
  PAGE=$(curl -fsS -b "$JAR" -c "$JAR" "$LOCATION")
  CSRF=$(hidden "$PAGE" csrf)
  CREQ=$(hidden "$PAGE" req)
  read -r STATUS LOCATION < <(post_form "$GW/consent" "decision=allow" "csrf=$CSRF" "req=$CREQ")
  [ "$STATUS" = "303" ] || fail "POST /consent answered $STATUS (want 303)"
fi
case "$LOCATION" in
  "$REDIRECT_URI"\?*) ;;
  *) fail "not redirected back to the app: $LOCATION" ;;
esac
CODE=$(param "$LOCATION" code)
[ -n "$CODE" ] || fail "no code in $LOCATION"
[ "$(param "$LOCATION" state)" = "$STATE" ] || fail "state not returned in $LOCATION"

say "code -> token (PKCE)"
TOKENS=$(curl -fsS -X POST "$GW/oauth2/token" \
  --data-urlencode grant_type=authorization_code \
  --data-urlencode "code=$CODE" \
  --data-urlencode "redirect_uri=$REDIRECT_URI" \
  --data-urlencode "client_id=$CLIENT_ID" \
  --data-urlencode "code_verifier=$VERIFIER")
ACCESS=$(printf '%s' "$TOKENS" | sed -n 's/.*"access_token": *"\([^"]*\)".*/\1/p')
[ -n "$ACCESS" ] || fail "no access_token in: $TOKENS"

say "API call with the token: identity headers at the upstream"
BODY=$(curl -fsS -H "Authorization: Bearer $ACCESS" -H "X-Authenticated-UserId: spoofed" "$GW/mobile/hello")
USER_ID=$(printf '%s' "$BODY" | sed -n 's/.*"x-authenticated-userid": *\[ *"\([^"]*\)".*/\1/p')
[ -n "$USER_ID" ] || fail "no X-Authenticated-UserId at the upstream: $BODY"
[ "$USER_ID" != "spoofed" ] || fail "a client-supplied X-Authenticated-UserId reached the upstream"
printf '%s' "$USER_ID" | grep -Eq '^[0-9a-f-]{36}$' || fail "X-Authenticated-UserId is not a UUID: $USER_ID"
printf '%s' "$BODY" | grep -q "\"x-client-id\": *\[ *\"$CLIENT_ID\"" || fail "no X-Client-Id: $BODY"
printf '%s' "$BODY" | grep -q '"x-api-plan": *\[ *"basic"' || fail "no X-Api-Plan: $BODY"
printf '%s' "$BODY" | grep -q '"authorization": *\[' && fail "the bearer token was forwarded: $BODY"
echo "user id: $USER_ID"

code=$(curl -s -o /dev/null -w '%{http_code}' "$GW/mobile/hello")
[ "$code" = "401" ] || fail "a call without a token answered $code (want 401)"

say "burst: plan basic allows 10 per second, expect a 429"
GOT_429=0
for i in $(seq 1 40); do
  code=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $ACCESS" "$GW/mobile/hello")
  if [ "$code" = "429" ]; then GOT_429=1; break; fi
done
[ "$GOT_429" = "1" ] || fail "no 429 after 40 rapid requests"
echo "429 after $i requests"

say "E2E PASSED"
