//! Harness for eddy's privileged end-to-end tests and benchmarks.
//!
//! Every resource a test makes is an RAII guard that cleans up on drop: a child cgroup
//! ([`cgroup::CgroupGuard`]), an upstream host in a network namespace ([`netns::Netns`]),
//! child processes ([`process::ProcessGuard`]) and eddy itself ([`eddy::Eddy`]). Names,
//! ports and pin dirs are unique per process and per test, so a crashed run cannot collide
//! with the next one.
use std::path::PathBuf;

use anyhow::Result;

pub mod basics;
pub mod cgroup;
pub mod cluster;
pub mod containerd;
pub mod cri;
pub mod eddy;
pub mod netns;
pub mod oci;
pub mod pki;
pub mod privileges;
pub mod probe;
pub mod process;
pub mod registry;
pub mod registry_eddy;
pub mod token_auth;
pub mod wire;
pub mod world;

pub use basics::{next_id, tail, unique_suffix, INTERCEPTED_PORT, MIB, OTHER_PORT};
pub use cgroup::CgroupGuard;
pub use eddy::{Eddy, EddyConfig};
pub use netns::Netns;
pub use privileges::require_privileges;
pub use probe::Probe;
pub use process::ProcessGuard;

/// What every privileged test needs: the binaries under test.
pub struct Ctx {
    pub eddy_bin: PathBuf,
    pub probe: Probe,
}

impl Ctx {
    /// `probe_bin`: `env!("CARGO_BIN_EXE_eddy-probe")`. Panics if EDDY_BIN is unset.
    pub fn new(probe_bin: impl Into<PathBuf>) -> Self {
        Self {
            eddy_bin: eddy::eddy_bin(),
            probe: Probe::new(probe_bin),
        }
    }

    pub fn start_eddy(&self, config: &EddyConfig) -> Result<Eddy> {
        Eddy::start(&self.eddy_bin, config)
    }
}

/// A test's world: a fresh cgroup to hook, and an upstream host in a netns serving echo
/// on the intercepted and the other port, over IPv4 and IPv6.
///
/// Fields drop in declaration order: the server first (it keeps the netns busy), then the
/// netns, then the cgroup.
pub struct World {
    pub server: ProcessGuard,
    pub netns: Netns,
    pub cgroup: CgroupGuard,
}

impl World {
    pub fn new(probe: &Probe) -> Result<Self> {
        let cgroup = CgroupGuard::new()?;
        let netns = Netns::new()?;
        let listen = [
            netns.v4(INTERCEPTED_PORT),
            netns.v6(INTERCEPTED_PORT),
            netns.v4(OTHER_PORT),
            netns.v6(OTHER_PORT),
        ];
        let server = probe.serve(&netns, &listen)?;
        Ok(Self {
            server,
            netns,
            cgroup,
        })
    }

    /// One echo of `bytes` to `dst` from the hooked cgroup but inside the upstream's own
    /// network namespace: another netns than eddy's.
    pub fn echo_from_upstream_netns(
        &self,
        probe: &Probe,
        dst: std::net::SocketAddr,
        bytes: u64,
        timeout: std::time::Duration,
    ) -> Result<wire::EchoReport> {
        probe.echo_in_netns(&self.netns, dst, bytes, timeout, Some(self.cgroup.path()))
    }
}
