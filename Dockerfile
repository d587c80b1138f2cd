# eddy node agent image. Build from the repository root: docker build -t eddy .
#
# The eBPF object needs Debian's rustc-web (prebuilt `core` for bpfel-unknown-none) and
# bpf-linker built against LLVM 22; see ../shared/facts/toolchain.md. The same compiler
# builds the user-space agent.
FROM debian:bookworm AS build
RUN echo 'deb http://deb.debian.org/debian-security bookworm-security main' \
      > /etc/apt/sources.list.d/security.list \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      rustc-web cargo-web libstd-rust-web-dev-bpf llvm-22-dev libpolly-22-dev \
      build-essential pkg-config ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo xtask build

FROM debian:bookworm-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/eddy /usr/local/bin/eddy
ENTRYPOINT ["/usr/local/bin/eddy"]
CMD ["run"]
