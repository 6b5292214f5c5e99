# syntax=docker/dockerfile:1.7
# One multi-stage build, three small runtime images (distroless, no shell, user 65532):
#
#   docker build --target operator -t gatehouse-operator:dev .
#   docker build --target gateway  -t gatehouse-gateway:dev  .
#   docker build --target echo     -t gatehouse-echo:dev     .   # demo upstream for tests/kind/e2e.sh
#
# Dockerfile.operator and Dockerfile.gateway are thin aliases of the first two targets.

ARG RUST_VERSION=1.89
ARG DEBIAN=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN} AS builder
# PGO=1 (default): the gateway is built with profile-guided optimization, trained on the
# benchmark's load (scripts/pgo-build.sh, in the gateway-build stage below; about 17 more
# minutes on 2 cores). This is the build the README's Performance numbers measure.
# --build-arg PGO=0 ships the plain release build. The training's tools get their own layer,
# before the sources, so a source change does not download them again.
ARG PGO=1
RUN if [ "$PGO" = 1 ]; then \
      apt-get update && apt-get install -y --no-install-recommends nginx wrk redis-server \
      && rm -rf /var/lib/apt/lists/* && rustup component add llvm-tools; \
    fi
WORKDIR /src
COPY . .
# The cache mounts keep the registry and target/ between builds; the binaries are copied out
# of the cached target/ because it is not part of the image layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked \
      --bin gatehouse-operator --bin gatehouse-gateway --bin gatehouse-echo \
 && mkdir -p /out \
 && cp target/release/gatehouse-operator target/release/gatehouse-gateway \
       target/release/gatehouse-echo /out/

# Only the gateway image pays for the PGO build.
FROM builder AS gateway-build
ARG PGO=1
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    if [ "$PGO" = 1 ]; then scripts/pgo-build.sh && cp target/pgo/gatehouse-gateway /out/; fi

# distroless/cc: glibc + libgcc for the Rust binaries (TLS is rustls, no OpenSSL), CA
# certificates, /etc/passwd with nonroot = 65532, and nothing else (no shell, no package manager).
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
USER 65532:65532
WORKDIR /tmp

FROM runtime AS operator
COPY --from=builder /out/gatehouse-operator /usr/local/bin/gatehouse-operator
EXPOSE 9090
ENTRYPOINT ["/usr/local/bin/gatehouse-operator"]

FROM runtime AS echo
COPY --from=builder /out/gatehouse-echo /usr/local/bin/gatehouse-echo
EXPOSE 9001
ENTRYPOINT ["/usr/local/bin/gatehouse-echo"]
CMD ["--listen", "0.0.0.0:9001"]

# Last, so that a plain `docker build .` gives the gateway.
FROM runtime AS gateway
COPY --from=gateway-build /out/gatehouse-gateway /usr/local/bin/gatehouse-gateway
# Writes nothing outside --data-dir (only used without --redis; the chart mounts /tmp).
ENV GATEHOUSE_DATA_DIR=/tmp/gatehouse-data
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/gatehouse-gateway"]
