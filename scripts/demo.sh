#!/usr/bin/env bash
# The whole flow on one machine: an echo upstream on 127.0.0.1:9001 and the gateway on
# http://localhost:8080 serving examples/mobile (state in ./gatehouse-data). Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."

LISTEN=${GATEHOUSE_LISTEN:-127.0.0.1:8080}
ADMIN=${GATEHOUSE_ADMIN_LISTEN:-127.0.0.1:9090}
PORT=${LISTEN##*:}
export GATEHOUSE_ISSUER=${GATEHOUSE_ISSUER:-http://localhost:$PORT}

scripts/need.sh make:make gcc:cc   # jemalloc, the gateway's allocator, is built from source
cargo build --quiet -p gatehouse-gateway -p gatehouse-tests --bins
./target/debug/gatehouse-echo --listen 127.0.0.1:9001 &
ECHO_PID=$!
trap 'kill $ECHO_PID ${GW_PID:-} 2>/dev/null || true' EXIT INT TERM
./target/debug/gatehouse-gateway --manifests examples/mobile --listen "$LISTEN" --admin-listen "$ADMIN" &
GW_PID=$!

for _ in $(seq 1 100); do
  curl -fsS "http://$ADMIN/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done

# A PKCE pair for the walkthrough (RFC 7636 Appendix B's example values).
VERIFIER=dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk
CHALLENGE=E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM
cat <<MSG

gatehouse is running.
  gateway      $GATEHOUSE_ISSUER        (admin: http://$ADMIN/metrics)
  upstream     http://127.0.0.1:9001        (echoes the headers it receives)

1. Open this in a browser, sign up, allow access:
   $GATEHOUSE_ISSUER/oauth2/authorize?response_type=code&client_id=demo-app-mobile&redirect_uri=http%3A%2F%2F127.0.0.1%3A9%2Fcallback&scope=profile&state=xyz&code_challenge=$CHALLENGE&code_challenge_method=S256

   The browser ends on http://127.0.0.1:9/callback?code=...&state=xyz&iss=... (that page will
   not load: it is where the app would be). Copy the code from the address bar.

2. Exchange it (within 60 seconds):
   curl -s $GATEHOUSE_ISSUER/oauth2/token -d grant_type=authorization_code -d client_id=demo-app-mobile \\
     -d redirect_uri=http://127.0.0.1:9/callback -d code_verifier=$VERIFIER -d code=PASTE_CODE

3. Call the API as that user (the echo shows X-Authenticated-UserId and friends):
   curl -s $GATEHOUSE_ISSUER/mobile/hello -H "Authorization: Bearer PASTE_ACCESS_TOKEN"

Or as a service, without a user:
   curl -s -u demo-service-mobile:demo-secret-change-me-0123456789abcdef $GATEHOUSE_ISSUER/oauth2/token -d grant_type=client_credentials

Press Ctrl-C to stop.
MSG
wait $GW_PID
