//! Writing `tls`'s files (the CA, the host trust bundle) through the one durable atomic-write
//! helper, with errors in `tls`'s terms.
use std::path::Path;

use crate::node::durable;

use super::error::TlsError;

/// Replace `path` with `contents` so that a crash leaves the old file or the new one, never a torn
/// one, created with `mode` (and `owner`) from the start (see [`crate::node::durable`]).
pub(super) fn write_atomic(
    path: &Path,
    contents: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> Result<(), TlsError> {
    let options = durable::Options::new().mode(mode).owner(owner);
    durable::write_atomic(path, contents, &options).map_err(|source| TlsError::Write {
        path: path.to_path_buf(),
        source,
    })
}
