//! One owner per data dir: `eddy run` holds an exclusive `flock` on `<data_dir>/eddy.lock` for
//! its whole life. Two agents on one store would delete each other's partial fills and race
//! their commits. The kernel drops the lock when the process dies (kill -9 included), so a stale
//! file never blocks a restart. The file records the holder's pid, for the error message.
use std::{
    fs::{File, OpenOptions},
    io::{self, Read, Seek, Write},
    path::{Path, PathBuf},
};

const LOCK_FILE: &str = "eddy.lock";

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("data dir {} is in use by another eddy{}: one eddy per data dir", dir.display(), holder.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    Held { dir: PathBuf, holder: Option<u32> },
    #[error("lock file {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

/// The held lock; released when dropped (or when the process exits).
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

fn open(data_dir: &Path) -> Result<(File, PathBuf), LockError> {
    let path = data_dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|source| LockError::Io {
            path: path.clone(),
            source,
        })?;
    Ok((file, path))
}

/// Takes the data dir's lock, or says who holds it.
pub fn acquire(data_dir: &Path) -> Result<DataDirLock, LockError> {
    let (mut file, path) = open(data_dir)?;
    match crate::node::sys::try_lock_exclusive(&file) {
        Ok(true) => {}
        Ok(false) => {
            return Err(LockError::Held {
                dir: data_dir.to_path_buf(),
                holder: read_pid(&mut file),
            })
        }
        Err(source) => return Err(LockError::Io { path, source }),
    }
    let pid = std::process::id();
    let written = file
        .set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| writeln!(file, "{pid}"));
    written.map_err(|source| LockError::Io { path, source })?;
    Ok(DataDirLock { _file: file })
}

/// Whether an agent holds the data dir (Some(pid, if recorded)), without taking it for long.
pub fn holder(data_dir: &Path) -> Result<Option<Option<u32>>, LockError> {
    match acquire(data_dir) {
        Ok(_released_on_drop) => Ok(None),
        Err(LockError::Held { holder, .. }) => Ok(Some(holder)),
        Err(e) => Err(e),
    }
}

fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.rewind().ok()?;
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_owner_is_refused_with_the_holders_pid() {
        let dir = tempfile::tempdir().unwrap();
        let lock = acquire(dir.path()).unwrap();
        // flock conflicts between open file descriptions, even within one process.
        let err = acquire(dir.path()).unwrap_err();
        assert!(
            matches!(err, LockError::Held { holder: Some(p), .. } if p == std::process::id()),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(
            text.contains("in use by another eddy")
                && text.contains(&std::process::id().to_string()),
            "{text}"
        );
        assert!(!text.contains('\n'));
        assert_eq!(holder(dir.path()).unwrap(), Some(Some(std::process::id())));
        drop(lock);
        // Released with its holder: a restart is never blocked by the file left behind.
        assert_eq!(holder(dir.path()).unwrap(), None);
        let _again = acquire(dir.path()).unwrap();
    }

    #[test]
    fn an_unusable_data_dir_is_an_io_error() {
        let err = acquire(Path::new("/nonexistent/eddy-data")).unwrap_err();
        assert!(matches!(err, LockError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains("/nonexistent/eddy-data/eddy.lock"));
    }
}
