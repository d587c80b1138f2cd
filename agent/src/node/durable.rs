//! Replacing a file so that a crash leaves the old content or the new, never a torn file: write a
//! temp file in the same directory, fsync it, rename it over the target, fsync the directory.
//! Every file eddy replaces goes through [`write_atomic`]; a file streamed into place by its own
//! rename (the store's blob commit) shares [`sync_dir`].
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// How the replacement is created. [`Options::new`] is a plain file (mode 0666 less the umask),
/// fsync'd.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    mode: u32,
    /// Set the mode exactly, past the umask.
    exact_mode: bool,
    owner: Option<(u32, u32)>,
    sync: bool,
}

impl Options {
    pub const fn new() -> Options {
        Options {
            mode: 0o666,
            exact_mode: false,
            owner: None,
            sync: true,
        }
    }

    /// Exactly this mode (0600 for keys), from the moment the temp file exists: a key is never
    /// readable by others, not even briefly, and a trust bundle stays readable under any umask.
    pub const fn mode(self, mode: u32) -> Options {
        Options {
            mode,
            exact_mode: true,
            ..self
        }
    }

    /// This owner (uid, gid), as the file being replaced had.
    pub const fn owner(self, owner: Option<(u32, u32)>) -> Options {
        Options { owner, ..self }
    }

    /// Skips both fsyncs: still atomic (old or new, never torn) after a kill, but after a power
    /// loss possibly the old content. Only for records that are re-verified when read and cheap
    /// to lose (a fill's resume checkpoint, written every few MiB on the hot path).
    pub const fn without_fsync(self) -> Options {
        Options {
            sync: false,
            ..self
        }
    }
}

impl Default for Options {
    fn default() -> Options {
        Options::new()
    }
}

/// Replaces `path` with `contents` atomically (and durably, unless [`Options::without_fsync`]).
/// On error the old file is untouched and no temp file is left behind.
pub fn write_atomic(path: &Path, contents: &[u8], options: &Options) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{:08x}", rand::random::<u32>()));
    let result = write_then_rename(&tmp, path, contents, options);
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    if options.sync {
        sync_dir(dir)?;
    }
    Ok(())
}

fn write_then_rename(
    tmp: &Path,
    path: &Path,
    contents: &[u8],
    options: &Options,
) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(options.mode)
        .open(tmp)?;
    if options.exact_mode {
        file.set_permissions(fs::Permissions::from_mode(options.mode))?;
    }
    if let Some((uid, gid)) = options.owner {
        std::os::unix::fs::fchown(&file, Some(uid), Some(gid))?;
    }
    file.write_all(contents)?;
    if options.sync {
        file.sync_all()?;
    }
    fs::rename(tmp, path)
}

/// Makes the renames (and creations, removals) in `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn replaces_content_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.json");
        write_atomic(&path, b"one", &Options::new()).unwrap();
        write_atomic(&path, b"two", &Options::new()).unwrap();
        write_atomic(&path, b"three", &Options::new().without_fsync()).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"three");
        assert_eq!(names(dir.path()), vec!["f.json"]);
    }

    #[test]
    fn sets_the_mode_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        fs::write(&key, b"old").unwrap();
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        write_atomic(&key, b"secret", &Options::new().mode(0o600)).unwrap();
        let mode = fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let bundle = dir.path().join("bundle");
        write_atomic(&bundle, b"pem", &Options::new().mode(0o644)).unwrap();
        let mode = fs::metadata(&bundle).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
    }

    #[test]
    fn an_error_leaves_the_old_content_and_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        // The rename fails: what stands at the target is a directory that is not empty.
        let target = dir.path().join("d");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("inside"), b"old").unwrap();
        assert!(write_atomic(&target, b"new", &Options::new()).is_err());
        assert_eq!(fs::read(target.join("inside")).unwrap(), b"old");
        assert_eq!(names(dir.path()), vec!["d"]);
        // The temp file cannot be created: a missing directory.
        let missing = dir.path().join("no/such/f");
        assert!(write_atomic(&missing, b"new", &Options::new()).is_err());
        assert_eq!(names(dir.path()), vec!["d"]);
    }
}
