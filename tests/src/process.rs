//! Child processes that cannot outlive a test, and commands that cannot hang one.
// unsafe: kill(2), sysconf and getrusage for the processes the tests start. Each block says why it is sound.
#![allow(unsafe_code)]
use std::{
    io::Read,
    process::{Child, Command, ExitStatus, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

/// A child process killed (SIGKILL) and reaped when dropped.
pub struct ProcessGuard {
    name: String,
    child: Child,
    exited: Option<ExitStatus>,
}

impl ProcessGuard {
    /// Spawn a server that prints a line `ready` on stdout once it serves, and wait (at most
    /// `timeout`) for it. Its stdout keeps being drained by a thread.
    pub fn spawn_until_ready(name: &str, cmd: &mut Command, timeout: Duration) -> Result<Self> {
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped());
        let mut process = Self::spawn(name, cmd)?;
        let stdout = process.child_mut().stdout.take().expect("stdout is piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut seen = Vec::new();
        loop {
            match rx.recv_timeout(timeout) {
                Ok(line) if line == "ready" => return Ok(process),
                Ok(line) => seen.push(line),
                Err(_) => anyhow::bail!(
                    "{name} not ready within {timeout:?} (exit: {:?}); output so far: {seen:?}",
                    process.try_wait()?
                ),
            }
        }
    }

    pub fn spawn(name: &str, cmd: &mut Command) -> Result<Self> {
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name}: {cmd:?}"))?;
        Ok(Self {
            name: name.to_string(),
            child,
            exited: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Send a signal. Refuses once the child is reaped: its pid may belong to someone else.
    pub fn signal(&mut self, signal: libc::c_int) -> Result<()> {
        if self.try_wait()?.is_some() {
            bail!("{} already exited; not signalling a reused pid", self.name);
        }
        // SAFETY: kill(2) with a pid we spawned and have not reaped yet.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        if rc != 0 {
            bail!(
                "kill({}, {signal}) for {}: {}",
                self.child.id(),
                self.name,
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// The exit status, if the child has exited (reaps it).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().context("waitpid")?;
        }
        Ok(self.exited)
    }

    /// Wait at most `timeout` for the child to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL and reap.
    pub fn kill_and_wait(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        let _ = self.child.kill();
        let status = self.child.wait().context("waitpid after SIGKILL")?;
        self.exited = Some(status);
        Ok(status)
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        // A SIGSTOPped child still dies of SIGKILL, so no SIGCONT is needed.
        let _ = self.kill_and_wait();
    }
}

/// Run a command to completion with captured output, killing it after `timeout`.
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let what = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut guard = ProcessGuard::spawn(&what, cmd)?;
    // Drain both pipes on threads so a chatty child cannot block on a full pipe.
    let mut stdout = guard.child_mut().stdout.take().expect("piped");
    let mut stderr = guard.child_mut().stderr.take().expect("piped");
    let out_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let status = guard.wait_timeout(timeout)?;
    let timed_out = status.is_none();
    let status = match status {
        Some(status) => status,
        None => guard.kill_and_wait()?,
    };
    // The pipes close when the child (and anything it forked that kept them) is gone.
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    if timed_out {
        bail!(
            "{what} did not finish within {timeout:?}; stdout: {}; stderr: {}",
            String::from_utf8_lossy(&stdout).trim(),
            String::from_utf8_lossy(&stderr).trim()
        );
    }
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Run a setup command (ip, bpftool, ...) that must succeed within 30 s.
pub fn run_ok(cmd: &mut Command) -> Result<Output> {
    let what = format!("{cmd:?}");
    let out = run_bounded(cmd, Duration::from_secs(30))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// VmRSS of a process, in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    proc_status_kib(pid, "VmRSS:")
}

/// utime + stime of a process, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the parenthesised comm; utime and stime are fields 14 and 15.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields
        .get(11..13)
        .map(|f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / hz
}

/// VmHWM (peak RSS) of a process, in KiB.
pub fn peak_rss_kib(pid: u32) -> Result<u64> {
    proc_status_kib(pid, "VmHWM:")
}

fn proc_status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// Open file descriptors of a process.
pub fn open_fds(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// User and system CPU time of this process (`libc::RUSAGE_SELF`) or of its reaped
/// children (`libc::RUSAGE_CHILDREN`), in seconds.
pub fn rusage_cpu_seconds(who: libc::c_int) -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we own.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(who, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}
