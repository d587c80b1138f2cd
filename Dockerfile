# eddy node agent image. Build from the repository root: docker build -t eddy .
# The same image as `cargo xtask image` (umoci, no Docker needed): FROM scratch with the
# eddy binary, the shared libraries it links (libc6, libgcc-s1) and the CA roots.
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
RUN cargo xtask build \
 && objcopy --strip-debug target/release/eddy /eddy \
 && mkdir -p /rootfs/var/lib/eddy /rootfs/tmp /rootfs/etc/eddy \
 && ldd /eddy | grep -o '/[^ ]*' | xargs -I{} cp --parents -L {} /rootfs/

FROM scratch
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="eddy" \
      org.opencontainers.image.description="Transparent, fail-open container registry cache for every node" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/eddy-project/eddy"
COPY --from=build /rootfs/ /
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /eddy /usr/local/bin/eddy
ENV PATH=/usr/local/bin SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
ENTRYPOINT ["/usr/local/bin/eddy"]
CMD ["run"]
