//! Whether this machine can run the privileged tests: root, cgroup v2, BPF, the tools.
// unsafe: geteuid and a probing bpf(2) call. Each block says why it is sound.
#![allow(unsafe_code)]
use std::{fs, io::Write, path::Path, process::Command};

use crate::cgroup::cgroup2_mount;

/// Returns true when the privileged tests can run. Otherwise FAILS (panics) with the reason,
/// unless `EDDY_ALLOW_SKIP=1`, in which case it prints a loud SKIPPED line and returns
/// false. A privileged test never passes silently.
pub fn require_privileges() -> bool {
    let Err(reason) = check() else {
        return true;
    };
    if std::env::var("EDDY_ALLOW_SKIP").as_deref() == Ok("1") {
        let line = format!("\n!!!!! SKIPPED (EDDY_ALLOW_SKIP=1): {reason} !!!!!\n");
        // libtest captures println!/eprintln! of passing tests; writing to the stderr
        // handle directly bypasses that, so the skip is visible in every run.
        let _ = std::io::stderr().write_all(line.as_bytes());
        return false;
    }
    panic!(
        "privileged test cannot run: {reason}\n\
         Run it as root on a machine with cgroup v2 and BPF (`cargo xtask test` does), or set \
         EDDY_ALLOW_SKIP=1 to skip it visibly."
    );
}

fn check() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not running as root (needed for cgroups, BPF and netns)".into());
    }
    if cgroup2_mount().is_none() {
        return Err("no cgroup v2 mount in /proc/mounts".into());
    }
    for tool in [
        ["ip", "-V"],
        ["bpftool", "version"],
        ["unshare", "--version"],
    ] {
        let ok = Command::new(tool[0])
            .arg(tool[1])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !ok {
            return Err(format!(
                "`{}` is not available (apt-get install iproute2 bpftool util-linux)",
                tool[0]
            ));
        }
    }
    ensure_bpffs()?;
    bpf_syscall_works()
}

/// eddy pins its maps under /sys/fs/bpf, which is not mounted at boot on every machine.
fn ensure_bpffs() -> Result<(), String> {
    let mounts = fs::read_to_string("/proc/mounts").map_err(|e| format!("/proc/mounts: {e}"))?;
    let mounted = mounts.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() > 2 && fields[1] == "/sys/fs/bpf" && fields[2] == "bpf"
    });
    if mounted {
        return Ok(());
    }
    if !Path::new("/sys/fs/bpf").is_dir() {
        return Err("/sys/fs/bpf does not exist (no BPF filesystem support?)".into());
    }
    eprintln!("mounting bpffs at /sys/fs/bpf for the pinned maps");
    let out = Command::new("mount")
        .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
        .output()
        .map_err(|e| format!("mount -t bpf: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "bpffs is not mounted at /sys/fs/bpf and mounting it failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Create (and close) a one-entry array map: proves the bpf() syscall is allowed here.
fn bpf_syscall_works() -> Result<(), String> {
    // union bpf_attr, BPF_MAP_CREATE layout: map_type, key_size, value_size, max_entries,
    // then fields that must stay zero.
    let mut attr = [0u32; 32];
    attr[0] = 2; // BPF_MAP_TYPE_ARRAY
    attr[1] = 4;
    attr[2] = 8;
    attr[3] = 1;
    const BPF_MAP_CREATE: libc::c_long = 0;
    // SAFETY: attr outlives the call and is as large as we say; the kernel only reads it.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            attr.as_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd < 0 {
        return Err(format!(
            "the bpf() syscall failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: fd is a descriptor we just got from the kernel and own.
    unsafe { libc::close(fd as libc::c_int) };
    Ok(())
}
