//! What can go wrong in the store, as one cloneable error: a failed fill hands the same error to
//! every reader waiting on it.
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::oci::digest::Digest;

/// Any error the upstream body or fetch may produce (the crate's one boxed error).
pub use crate::node::error::BoxError;

/// Cloneable so a failed fill can hand the same error to every waiting reader.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },
    #[error("reading {digest}: {source}")]
    Read {
        digest: Digest,
        #[source]
        source: Arc<io::Error>,
    },
    #[error("upstream fetch of {digest} failed: {source}")]
    Upstream {
        digest: Digest,
        #[source]
        source: Arc<dyn std::error::Error + Send + Sync + 'static>,
    },
    #[error("content does not match {expected}: got {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error(
        "length of {digest} does not match: upstream announced {expected} bytes, sent {actual}"
    )]
    LengthMismatch {
        digest: Digest,
        expected: u64,
        actual: u64,
    },
    #[error("range {start}..{end:?} not satisfiable for {digest} of {len} bytes")]
    RangeNotSatisfiable {
        digest: Digest,
        start: u64,
        end: Option<u64>,
        len: u64,
    },
    #[error("fill of {digest} ended without a result (task panicked or runtime shut down)")]
    Aborted { digest: Digest },
}

/// Maps an I/O error on `path` during `op`.
pub(super) fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_path_buf(),
        source: Arc::new(source),
    }
}

/// The result of a blocking task: a panic or cancellation becomes an I/O error.
pub(super) fn joined<T>(result: Result<io::Result<T>, tokio::task::JoinError>) -> io::Result<T> {
    result.unwrap_or_else(|join| Err(io::Error::other(join)))
}
