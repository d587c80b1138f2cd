//! The eBPF side, from user space: load, configure, pin and attach the `cgroup/connect4/6`
//! hooks, the heartbeat, the original-destination lookup (`bpf`), the kernel's decision logs
//! (`decision_log`) and finding the cgroup to attach to (`cgroup`).
//!
//! May import `node` (syscalls) only.
pub mod bpf;
pub mod cgroup;
pub mod decision_log;
pub mod metrics;
