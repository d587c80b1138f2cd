//! The trust gate: eddy terminates TLS for a client only when that client trusts eddy's CA.
//! Any other client is passed through untouched, so its pull still works (uncached) instead
//! of failing with "certificate signed by unknown authority".
//!
//! - The connect hook records the calling process (tgid, cgroup id) beside the original
//!   destination; the proxy asks [`TrustGate::judge`] before terminating TLS.
//! - A process trusts eddy when eddy's CA is among the roots it reads (see [`roots`]) and
//!   was there before the process started: Go reads its roots once per process, so a
//!   containerd started before `eddy ca install` never sees the CA until it restarts.
//! - Verdicts are kept per (pid, process start time): a process's roots do not change for
//!   Go, and a reused pid is a new process. The data path then costs one read of
//!   /proc/PID/stat per connection.
//! - Reactive guard: when a client still rejects eddy's certificate (roots given on its
//!   command line, a trust store the gate does not know), the same executable in the same
//!   cgroup is passed through for [`GUARD_FOR`]. That first connection is lost: the client
//!   saw a TLS error, and retries.
pub mod metrics;
pub mod process;
pub mod roots;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::{node::sys, trust::metrics::TrustMetrics};

/// How long the reactive guard passes an executable through after it rejected eddy's
/// certificate.
pub const GUARD_FOR: Duration = Duration::from_secs(10 * 60);
/// Processes whose verdict is remembered; the least recently seen quarter is dropped when
/// full.
const MAX_PROCESSES: usize = 4096;
/// (executable, cgroup) pairs the guard holds at once.
const MAX_GUARDED: usize = 1024;

/// What `eddy status` and the operator should do about an untrusting client.
pub const FIX: &str = "restart containerd once (after `eddy ca install`), or set trust.restartContainerd in the chart";

/// The process behind a redirected connection, as the connect hook recorded it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientProcess {
    /// Process id in the initial pid namespace; 0 when unknown.
    pub tgid: u32,
    /// cgroup v2 id of the process's cgroup; 0 when unknown.
    pub cgroup_id: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrustVerdict {
    /// eddy's CA was in the client's roots when it started: terminate TLS.
    Trusting,
    /// Pass the connection through untouched.
    Untrusting(Reason),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// eddy's CA is in none of the roots the process reads.
    CaNotInRoots,
    /// The CA entered the process's roots after it started, and Go reads them once.
    StartedBeforeCa,
    /// The same executable in the same cgroup rejected eddy's certificate recently.
    RejectedCertificate,
    /// No process id was recorded, the process is gone, or eddy cannot see host process
    /// ids. Passing through never breaks a pull; terminating might (this is the fail-open
    /// answer: such a connection is served, just not cached).
    Unidentified,
}

impl Reason {
    pub fn label(self) -> &'static str {
        match self {
            Reason::CaNotInRoots => "ca_not_in_roots",
            Reason::StartedBeforeCa => "started_before_ca",
            Reason::RejectedCertificate => "rejected_certificate",
            Reason::Unidentified => "unidentified",
        }
    }
}

/// Where the gate reads processes from, and how it tells time: the real /proc and clocks,
/// or a fake tree in unit tests.
#[derive(Clone, Debug)]
pub struct Host {
    pub proc_root: PathBuf,
    /// Wall-clock boot time; `None`: ask the kernel each time (follows clock steps).
    pub boot_time: Option<SystemTime>,
    /// Whether /proc numbers processes as the connect hook does (the initial pid namespace).
    pub pids_visible: bool,
}

impl Host {
    pub fn real() -> Self {
        Host {
            proc_root: PathBuf::from("/proc"),
            boot_time: None,
            pids_visible: sys::in_initial_pid_namespace(),
        }
    }
}

struct Known {
    start_ticks: u64,
    exe: PathBuf,
    cgroup_id: u64,
    /// Never `RejectedCertificate`: the guard is checked per connection.
    verdict: TrustVerdict,
    last_seen: Instant,
}

#[derive(Default)]
struct State {
    processes: HashMap<u32, Known>,
    /// (executable, cgroup id) → passed through until.
    guarded: HashMap<(PathBuf, u64), Instant>,
}

pub struct TrustGate {
    ca_der: Vec<u8>,
    host: Host,
    guard_for: Duration,
    ticks_per_second: u64,
    state: Mutex<State>,
    memo: roots::FileMemo,
    metrics: TrustMetrics,
}

impl TrustGate {
    pub fn new(ca_der: &[u8], host: Host, metrics: TrustMetrics) -> Self {
        if !host.pids_visible {
            warn!(
                "eddy does not run in the host's pid namespace, so it cannot tell which process \
                 opened a connection: every registry connection is passed through uncached \
                 (run eddy with hostPID)"
            );
        }
        TrustGate {
            ca_der: ca_der.to_vec(),
            host,
            guard_for: GUARD_FOR,
            ticks_per_second: sys::clock_ticks_per_second(),
            state: Mutex::default(),
            memo: roots::FileMemo::default(),
            metrics,
        }
    }

    /// As [`TrustGate::new`], with another guard period (tests).
    pub fn with_guard_for(mut self, guard_for: Duration) -> Self {
        self.guard_for = guard_for;
        self
    }

    /// The verdict for a connection of `client`. Cheap when the process was judged before;
    /// otherwise its roots are read on the blocking pool.
    pub async fn judge(self: &Arc<Self>, client: ClientProcess) -> TrustVerdict {
        match self.known_verdict(&client) {
            Ok(v) => v,
            Err(start_ticks) => {
                let gate = Arc::clone(self);
                tokio::task::spawn_blocking(move || gate.judge_new(&client, start_ticks))
                    .await
                    .unwrap_or(TrustVerdict::Untrusting(Reason::Unidentified))
            }
        }
    }

    /// The verdict for a connection of `client`, reading its roots if needed (blocking).
    pub fn verdict(&self, client: &ClientProcess) -> TrustVerdict {
        match self.known_verdict(client) {
            Ok(v) => v,
            Err(start_ticks) => self.judge_new(client, start_ticks),
        }
    }

    /// `Ok`: decided without reading roots. `Err(start_ticks)`: a process not judged yet.
    fn known_verdict(&self, client: &ClientProcess) -> Result<TrustVerdict, u64> {
        if client.tgid == 0 || !self.host.pids_visible {
            return Ok(self.unidentified(client, "no process id"));
        }
        let Ok(start_ticks) = process::start_ticks(&self.host.proc_root, client.tgid) else {
            return Ok(self.unidentified(client, "process gone"));
        };
        let mut state = self.state.lock().unwrap();
        let State {
            processes, guarded, ..
        } = &mut *state;
        match processes.get_mut(&client.tgid) {
            Some(known) if known.start_ticks == start_ticks => {
                known.last_seen = Instant::now();
                if is_guarded(guarded, &known.exe, client.cgroup_id) {
                    return Ok(TrustVerdict::Untrusting(Reason::RejectedCertificate));
                }
                Ok(known.verdict)
            }
            _ => Err(start_ticks),
        }
    }

    fn unidentified(&self, client: &ClientProcess, why: &str) -> TrustVerdict {
        debug!(
            pid = client.tgid,
            why, "client process unidentified; passing through"
        );
        self.metrics.verdict(Reason::Unidentified.label());
        TrustVerdict::Untrusting(Reason::Unidentified)
    }

    /// Read a new process's environment and roots, decide, remember.
    fn judge_new(&self, client: &ClientProcess, start_ticks: u64) -> TrustVerdict {
        let judging = Instant::now();
        let proc_root = &self.host.proc_root;
        let pid = client.tgid;
        let (Ok(mut env), Ok(root)) = (
            process::trust_env(proc_root, pid),
            process::root(proc_root, pid),
        ) else {
            return self.unidentified(client, "process gone");
        };
        process::anchor_relative(&mut env, proc_root, pid);
        let exe = process::exe(proc_root, pid);
        let boot = self.host.boot_time.unwrap_or_else(sys::boot_time);
        let started = process::started_at(boot, start_ticks, self.ticks_per_second);
        let places = roots::Places::of(&env);
        let verdict = match roots::ca_visible_since(&root, &places, &self.ca_der, &self.memo) {
            None => TrustVerdict::Untrusting(Reason::CaNotInRoots),
            // Process start times have clock-tick resolution (rounded down): a bundle
            // written in the same tick counts as later, which can only pass through.
            Some(since) if since >= started => TrustVerdict::Untrusting(Reason::StartedBeforeCa),
            Some(_) => TrustVerdict::Trusting,
        };
        let label = match verdict {
            TrustVerdict::Trusting => "trusting",
            TrustVerdict::Untrusting(r) => r.label(),
        };
        self.metrics.verdict(label);
        let judged_us = judging.elapsed().as_micros() as u64;
        match verdict {
            TrustVerdict::Trusting => {
                debug!(pid, exe = %exe.display(), judged_us, "client trusts eddy's CA")
            }
            TrustVerdict::Untrusting(reason) => info!(
                pid,
                exe = %exe.display(),
                cgroup_id = client.cgroup_id,
                reason = reason.label(),
                judged_us,
                "client does not trust eddy's CA: passing its registry connections through uncached; {FIX}"
            ),
        }

        let mut state = self.state.lock().unwrap();
        if state.processes.len() >= MAX_PROCESSES {
            evict_oldest_quarter(&mut state.processes);
        }
        let guarded = is_guarded(&mut state.guarded, &exe, client.cgroup_id);
        state.processes.insert(
            pid,
            Known {
                start_ticks,
                exe,
                cgroup_id: client.cgroup_id,
                verdict,
                last_seen: Instant::now(),
            },
        );
        if guarded {
            TrustVerdict::Untrusting(Reason::RejectedCertificate)
        } else {
            verdict
        }
    }

    /// The client rejected eddy's certificate: pass its executable in its cgroup through
    /// for a while.
    pub fn record_rejection(&self, client: &ClientProcess) {
        self.metrics.rejections.inc();
        let known_exe = {
            let state = self.state.lock().unwrap();
            state.processes.get(&client.tgid).map(|k| k.exe.clone())
        };
        let exe = known_exe.unwrap_or_else(|| process::exe(&self.host.proc_root, client.tgid));
        warn!(
            pid = client.tgid,
            exe = %exe.display(),
            cgroup_id = client.cgroup_id,
            for_secs = self.guard_for.as_secs(),
            "client rejected eddy's certificate: passing this executable in this cgroup through; {FIX}"
        );
        let mut state = self.state.lock().unwrap();
        let now = Instant::now();
        if state.guarded.len() >= MAX_GUARDED {
            state.guarded.retain(|_, until| *until > now);
            if state.guarded.len() >= MAX_GUARDED {
                return;
            }
        }
        state
            .guarded
            .insert((exe, client.cgroup_id), now + self.guard_for);
    }

    /// The untrusting clients still alive and the guarded executables, for `GET /trust`.
    pub fn report(&self) -> TrustReport {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap();
        state.guarded.retain(|_, until| *until > now);
        let mut clients: Vec<UntrustingClient> = state
            .processes
            .iter()
            .filter_map(|(&pid, k)| {
                let reason = match k.verdict {
                    TrustVerdict::Untrusting(r) => r,
                    TrustVerdict::Trusting => return None,
                };
                let alive = process::start_ticks(&self.host.proc_root, pid)
                    .is_ok_and(|t| t == k.start_ticks);
                alive.then(|| UntrustingClient {
                    pid: Some(pid),
                    exe: k.exe.display().to_string(),
                    cgroup_id: k.cgroup_id,
                    cgroup: None,
                    reason,
                    guarded_secs: None,
                })
            })
            .collect();
        for ((exe, cgroup_id), until) in &state.guarded {
            clients.push(UntrustingClient {
                pid: None,
                exe: exe.display().to_string(),
                cgroup_id: *cgroup_id,
                cgroup: None,
                reason: Reason::RejectedCertificate,
                guarded_secs: Some(until.saturating_duration_since(now).as_secs()),
            });
        }
        drop(state);
        clients.sort_by(|a, b| (a.pid, &a.exe).cmp(&(b.pid, &b.exe)));
        TrustReport {
            pids_visible: self.host.pids_visible,
            untrusting: clients,
            fix: FIX.to_string(),
        }
    }
}

fn is_guarded(guarded: &mut HashMap<(PathBuf, u64), Instant>, exe: &Path, cgroup: u64) -> bool {
    let key = (exe.to_path_buf(), cgroup);
    match guarded.get(&key) {
        Some(until) if *until > Instant::now() => true,
        Some(_) => {
            guarded.remove(&key);
            false
        }
        None => false,
    }
}

fn evict_oldest_quarter(processes: &mut HashMap<u32, Known>) {
    let mut seen: Vec<Instant> = processes.values().map(|k| k.last_seen).collect();
    seen.sort();
    let cutoff = seen[seen.len() / 4];
    processes.retain(|_, k| k.last_seen > cutoff);
}

/// `GET /trust` on the admin listener, read by `eddy status`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TrustReport {
    /// False: eddy cannot identify client processes, and passes every registry connection
    /// through.
    pub pids_visible: bool,
    pub untrusting: Vec<UntrustingClient>,
    pub fix: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct UntrustingClient {
    /// None for a guard entry (the executable, whichever process runs it).
    pub pid: Option<u32>,
    pub exe: String,
    pub cgroup_id: u64,
    /// Path of the cgroup, filled in by `eddy status` when it can find it.
    pub cgroup: Option<String>,
    pub reason: Reason,
    /// Seconds the guard still passes this executable through.
    pub guarded_secs: Option<u64>,
}

/// Whether a failed TLS accept means the client rejected eddy's certificate: an alert saying
/// so (Go sends bad_certificate, OpenSSL and rustls unknown_ca, Java certificate_unknown),
/// or the client hanging up mid-handshake, which it does after reading the server's
/// Certificate (eddy peeked at a complete ClientHello before accepting, so the server's
/// flight with the Certificate went out before the client could hang up).
pub fn is_certificate_rejection(e: &std::io::Error) -> bool {
    use rustls::AlertDescription as A;
    if let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        return matches!(
            tls,
            rustls::Error::AlertReceived(A::UnknownCA | A::BadCertificate | A::CertificateUnknown)
        );
    }
    matches!(
        e.kind(),
        std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::BrokenPipe
    )
}

#[cfg(test)]
mod tests;
