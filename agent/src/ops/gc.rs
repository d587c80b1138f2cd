//! `eddy gc`: apply the store's lifecycle policy now. A running agent holds the data dir's lock,
//! so the lock tells which way to go: ask that agent (`POST /gc` on its admin endpoint, with its
//! own policy), or, when none runs, take the lock and work on the data dir directly.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{bail, Context};

use crate::{
    store::datadir_lock,
    store::lifecycle::{GcReport, Lifecycle, Policy},
    store::Store,
};

/// What `eddy gc` was asked to do.
pub struct GcRequest {
    /// Report what would be removed, remove nothing.
    pub dry_run: bool,
    /// The running agent's admin address.
    pub admin: SocketAddr,
    /// The data dir, worked on directly when no agent holds it.
    pub data_dir: std::path::PathBuf,
    /// The policy for a direct run (a running agent applies its own).
    pub policy: Policy,
}

/// Runs the collection and returns its report.
pub fn run(args: &GcRequest) -> anyhow::Result<GcReport> {
    if !args.data_dir.is_dir() {
        bail!("data dir {} does not exist", args.data_dir.display());
    }
    match datadir_lock::acquire(&args.data_dir) {
        Ok(_lock) => {
            // Held until the collection is done: an agent starting meanwhile waits its turn.
            let store = std::sync::Arc::new(Store::open(&args.data_dir)?);
            let catalog =
                std::sync::Arc::new(crate::store::catalog::Catalog::open(&args.data_dir)?);
            Ok(Lifecycle::new(store, args.policy)
                .with_catalog(catalog)
                .collect(args.dry_run))
        }
        Err(datadir_lock::LockError::Held { holder, .. }) => {
            let path = if args.dry_run { "/gc?dry_run=1" } else { "/gc" };
            let body = post(args.admin, path).with_context(|| {
                format!(
                    "an eddy{} holds {}, but its admin endpoint {} did not answer (pass --admin)",
                    holder.map(|p| format!(" (pid {p})")).unwrap_or_default(),
                    args.data_dir.display(),
                    args.admin
                )
            })?;
            serde_json::from_str(&body)
                .with_context(|| format!("the agent's /gc answer is not a report: {body}"))
        }
        Err(e) => Err(e.into()),
    }
}

/// A minimal HTTP/1.1 POST to the admin endpoint (loopback, no body), returning a 200's body.
fn post(admin: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect_timeout(&admin, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {admin}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    let status = head.split_whitespace().nth(1).unwrap_or("?");
    if status != "200" {
        bail!("POST {path} answered {status}: {}", body.trim());
    }
    Ok(body.to_string())
}
