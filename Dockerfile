# syntax=docker/dockerfile:1
#
# magento-token-sidecar: build with cargo, run from distroless as uid 65532 (the Helm chart's
# sidecar.securityContext). Build from the repository root, one image per variant:
#   docker build -t registry.example.com/magento-token-sidecar:0.1.0 .
#   docker build --build-arg FEATURES=kubernetes -t registry.example.com/magento-token-sidecar:0.1.0-central .
# The first is the sidecar image (output.dir; no kube-rs, the smaller binary in every pod), the
# second the central image (output.kubernetes: the Lease and the Secret); the chart's
# `mode: central` runs the tag with `image.centralSuffix`.

# The toolchain the project is tested with (1.89 or later: File::try_lock), to the patch release:
# link/hot-functions.txt names functions as this compiler does (build.rs; the benchmark reports a
# stale list).
ARG RUST_VERSION=1.95.0

FROM rust:${RUST_VERSION}-bookworm AS build
# Cargo features beside the (always off) defaults: "" for the sidecar, "kubernetes" for central.
ARG FEATURES=""
WORKDIR /src
COPY . .
# The cache mounts keep the registry and target dir between builds (BuildKit). Without the default
# `demo` feature: the shipped binary holds no dev server and none of its dependencies.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --no-default-features --features "$FEATURES" --bin magento-token-sidecar \
 && install -D -m 0755 target/release/magento-token-sidecar /out/magento-token-sidecar

# glibc and CA certificates, no shell, no package manager; user 65532 "nonroot".
FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0
ARG REVISION=""
ARG SOURCE=""
LABEL org.opencontainers.image.title="magento-token-sidecar" \
      org.opencontainers.image.description="Keeps Magento 2 / Adobe Commerce customer tokens fresh on disk for the apps beside it" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot"
COPY --from=build /out/magento-token-sidecar /usr/local/bin/magento-token-sidecar
USER 65532:65532
# The admin server (/healthz, /readyz, /status, /metrics) when admin.listen is 0.0.0.0:9102.
EXPOSE 9102
ENTRYPOINT ["/usr/local/bin/magento-token-sidecar"]
CMD ["run", "--config", "/etc/magento-token-sidecar/config/config.yaml"]
