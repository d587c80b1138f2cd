# eddy node agent image. Build from the repository root:
#   docker build -t eddy --build-arg REVISION="$(git rev-parse HEAD)" .
# The same image as `cargo xtask image` (umoci, no Docker needed): FROM scratch with the
# eddy binary, the shared libraries it links (libc6, libgcc-s1), the CA roots, and the same
# labels. A label cannot be read from a file during the build, so VERSION is a build
# argument whose default is checked against agent/Cargo.toml (the version `eddy --version`
# reports): a release that bumps one without the other fails the build with the fix.
#
# The eBPF object needs Debian's rustc-web (prebuilt `core` for bpfel-unknown-none) and
# bpf-linker built against LLVM 22; the same compiler builds the user-space agent.
FROM debian:bookworm AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      rustc-web cargo-web libstd-rust-web-dev-bpf llvm-22-dev libpolly-22-dev \
      build-essential pkg-config ca-certificates binutils protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
ARG VERSION=0.1.0
RUN cargo_version="$(grep -m1 '^version = ' agent/Cargo.toml | cut -d'"' -f2)" \
 && if [ "$VERSION" != "$cargo_version" ]; then \
      echo "VERSION='$VERSION' is not agent/Cargo.toml's version $cargo_version: update the Dockerfile's ARG VERSION defaults, or build with --build-arg VERSION=$cargo_version" >&2; \
      exit 1; \
    fi
RUN cargo xtask build \
 && objcopy --strip-debug target/release/eddy /eddy \
 && mkdir -p /rootfs/var/lib/eddy /rootfs/tmp /rootfs/etc/eddy \
 && ldd /eddy | grep -o '/[^ ]*' | xargs -I{} cp --parents -L {} /rootfs/

FROM scratch
ARG VERSION=0.1.0
# The commit built (`git rev-parse HEAD`); .git is not in the build context.
ARG REVISION=unknown
LABEL org.opencontainers.image.title="eddy" \
      org.opencontainers.image.description="Transparent, fail-open container registry cache for every node" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/eddy-project/eddy"
COPY --from=build /rootfs/ /
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /eddy /usr/local/bin/eddy
ENV PATH=/usr/local/bin SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
ENTRYPOINT ["/usr/local/bin/eddy"]
CMD ["run"]
