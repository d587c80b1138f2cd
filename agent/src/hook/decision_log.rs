//! Kernel-side decision logs: each connect the hooks see is logged from eBPF with aya-log
//! ("redirect pid 1234: ::ffff:10.0.0.1 port 443 to eddy port 15443", or "skip pid ...:"
//! and why), read from aya-log's ring buffer and written to eddy's own log under the
//! tracing target `eddy::bpf` at debug level.
//!
//! Off by default. On with `eddy run --bpf-log` (`EDDY_BPF_LOG=true`), or when `EDDY_LOG` /
//! `RUST_LOG` enables `eddy::bpf` at debug. When off, the eBPF side is loaded with
//! aya-log's `AYA_LOG_LEVEL` global at 0: a read-only constant, so the verifier removes the
//! log calls and the hook runs exactly the code it ran without them.
// unsafe: registering the logger's ring-buffer fd with tokio is unsafe (fd ownership). Each block says why it is sound.
#![allow(unsafe_code)]
use std::os::fd::AsRawFd;

use aya::Ebpf;
use aya_log::EbpfLogger;
use tokio::io::{unix::AsyncFd, Interest};
use tracing::warn;

/// The tracing target the decisions are logged under.
pub const TARGET: &str = "eddy::bpf";
/// The eBPF global that gates aya-log's macros (`aya_log::LEVEL`).
pub const LEVEL_GLOBAL: &str = aya_log::LEVEL;

/// Whether the decision logs are on: the flag, or a log filter that shows them anyway.
pub fn wanted(flag: bool) -> bool {
    flag || tracing::enabled!(target: "eddy::bpf", tracing::Level::DEBUG)
}

/// The value for [`LEVEL_GLOBAL`]: debug when on, 0 (no level passes) when off.
pub fn level(on: bool) -> u8 {
    if on {
        aya_log::Level::Debug as u8
    } else {
        0
    }
}

/// A started reader of the eBPF side's log ring buffer.
pub type DecisionLog = EbpfLogger<TracingBridge>;

/// Take aya-log's ring buffer out of the loaded object, for [`spawn`].
pub fn open(ebpf: &mut Ebpf) -> Result<DecisionLog, aya_log::Error> {
    EbpfLogger::init_with_logger(ebpf, TracingBridge)
}

/// Read the ring buffer whenever it has records, until the runtime stops.
pub fn spawn(log: DecisionLog) {
    let fd = log.as_raw_fd();
    // SAFETY: the logger owns the ring buffer's map fd: it stays open, and as_raw_fd()
    // returns that same fd, for as long as the AsyncFd owns the logger.
    let registered = unsafe { AsyncFd::register_with_interest(log, Interest::READABLE) };
    let mut log = match registered {
        Ok(log) => log,
        Err(e) => {
            warn!(fd, error = %e, "cannot poll the eBPF decision log; it stays off");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            let Ok(mut ready) = log.readable_mut().await else {
                return;
            };
            ready.get_inner_mut().flush();
            ready.clear_ready();
        }
    });
}

/// aya-log hands records to a `log::Log`; this one passes them on to tracing, so they land
/// in eddy's log with its format (text or JSON) and filter.
pub struct TracingBridge;

impl log::Log for TracingBridge {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let message = record.args();
        // tracing's macros need the level as a constant.
        match record.level() {
            log::Level::Error => tracing::error!(target: "eddy::bpf", "{message}"),
            log::Level::Warn => tracing::warn!(target: "eddy::bpf", "{message}"),
            log::Level::Info => tracing::info!(target: "eddy::bpf", "{message}"),
            log::Level::Debug => tracing::debug!(target: "eddy::bpf", "{message}"),
            log::Level::Trace => tracing::trace!(target: "eddy::bpf", "{message}"),
        }
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_means_no_level_passes() {
        // aya-log-ebpf logs a record when `level as u8 <= AYA_LOG_LEVEL`.
        assert_eq!(level(false), 0);
        assert!(aya_log::Level::Error as u8 > level(false));
        assert!(aya_log::Level::Debug as u8 <= level(true));
        assert!((aya_log::Level::Trace as u8) > level(true));
    }

    #[test]
    fn the_flag_turns_it_on_without_a_subscriber() {
        assert!(wanted(true));
        assert!(!wanted(false));
    }
}
