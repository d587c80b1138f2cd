//! Child cgroups under the cgroup v2 mount, removed on drop.
// unsafe: kill(2) of the processes left in a test's cgroup. Each block says why it is sound.
#![allow(unsafe_code)]
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::process::run_ok;

/// Where cgroup v2 is mounted: /sys/fs/cgroup on unified hosts, /sys/fs/cgroup/unified on
/// hybrid ones (this test machine).
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.len() > 2 && fields[2] == "cgroup2").then(|| PathBuf::from(fields[1]))
    })
}

/// A fresh cgroup directory `<cgroup2 mount>/eddy-test-<pid>-<n>`. On drop, every process in
/// it (or below it) is killed and the directories are removed, deepest first.
pub struct CgroupGuard {
    path: PathBuf,
}

impl CgroupGuard {
    pub fn new() -> Result<Self> {
        let mount = cgroup2_mount().context("no cgroup2 mount in /proc/mounts")?;
        let path = mount.join(format!("eddy-test-{}", crate::basics::unique_suffix()));
        fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Create a child cgroup (removed with this one).
    pub fn child(&self, name: &str) -> Result<PathBuf> {
        let path = self.path.join(name);
        fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
        Ok(path)
    }

    /// Programs attached to this cgroup, from `bpftool -j cgroup show`.
    pub fn attached_programs(&self) -> Result<Vec<serde_json::Value>> {
        attached_programs(&self.path)
    }
}

/// `bpftool -j cgroup show PATH`: the BPF programs attached directly to a cgroup.
pub fn attached_programs(path: &Path) -> Result<Vec<serde_json::Value>> {
    let out = run_ok(
        Command::new("bpftool")
            .args(["-j", "cgroup", "show"])
            .arg(path),
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_str(&text).with_context(|| format!("bpftool cgroup show output: {text}"))
}

/// Kill everything in `dir` and its descendants, then remove them, deepest first.
fn remove_tree(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_tree(&entry.path())?;
        }
    }
    let procs = dir.join("cgroup.procs");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pids = fs::read_to_string(&procs).unwrap_or_default();
        if pids.trim().is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            bail!("{} still has processes: {}", dir.display(), pids.trim());
        }
        for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            // SAFETY: kill(2) has no memory-safety preconditions. These pids are in a
            // cgroup this test created; nothing else is put there.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        thread::sleep(Duration::from_millis(20));
    }
    // rmdir fails with EBUSY for a moment after the last process exits.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(e).with_context(|| format!("rmdir {}", dir.display()))
            }
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        if let Err(e) = remove_tree(&self.path) {
            eprintln!("warning: cleaning up cgroup {}: {e:#}", self.path.display());
        }
    }
}
