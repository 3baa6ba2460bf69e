//! Local files replaced whole: a reader (or a crash) sees the old contents or the new, never a
//! half-written file. The new contents go to a new file of the write's own name beside the
//! target — opened with `create_new`, so never through a link someone left at that name — are
//! flushed, renamed over the target, and the directory is flushed so the rename lasts. What
//! writes this way: approvals and resolutions a person gives locally (`contextos approve`,
//! `contextos resolve`) and the identity vault's key rings.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
};

/// How a whole file is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// As the process's umask says.
    Shared,
    /// Readable and writable by its owner only (key material).
    OwnerOnly,
}

/// A name for a write's temporary file beside `path`: `<prefix><pid>-<nanos><suffix>` in
/// `path`'s directory, so two writers never write into one file.
pub fn temporary_beside(path: &Path, prefix: &str, suffix: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let name = format!("{prefix}{}-{nanos}{suffix}", std::process::id());
    path.parent()
        .map_or_else(|| PathBuf::from(&name), |dir| dir.join(&name))
}

/// Replaces `path` with `bytes` by way of `temporary` (see [`temporary_beside`]), which is
/// removed if anything fails: a copy left behind could outlive what replaced it (a key a
/// rotation destroyed).
pub fn replace(path: &Path, temporary: &Path, bytes: &[u8], access: Access) -> std::io::Result<()> {
    let written = new_file(temporary, access).and_then(|mut file| {
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(temporary, path)
    });
    if let Err(e) = written {
        let _ = std::fs::remove_file(temporary);
        return Err(e);
    }
    // The rename is durable only once the directory is.
    match path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// A file created at `path`, never one that was there (nor a link's target).
pub fn new_file(path: &Path, access: Access) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    if access == Access::OwnerOnly {
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    }
    options.open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_replaced_whole_and_its_temporary_is_gone() {
        let dir = tempfile::tempdir().expect("a scratch directory");
        let path = dir.path().join("decisions.json");
        std::fs::write(&path, "old").expect("write");
        let temporary = temporary_beside(&path, "decisions.json.", ".tmp");
        assert_eq!(temporary.parent(), Some(dir.path()));
        replace(&path, &temporary, b"new", Access::Shared).expect("replaced");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "new");
        assert!(!temporary.exists());
    }

    /// Nothing is written where a link left at the temporary's name points, and the target
    /// keeps its contents.
    #[cfg(unix)]
    #[test]
    fn nothing_is_written_through_a_link_at_the_temporary_name() {
        let dir = tempfile::tempdir().expect("a scratch directory");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep me").expect("write");
        let path = dir.path().join("ring.json");
        std::fs::write(&path, "old").expect("write");
        let temporary = dir.path().join(".ring.json.new");
        std::os::unix::fs::symlink(&victim, &temporary).expect("link");
        assert!(replace(&path, &temporary, b"secret", Access::OwnerOnly).is_err());
        assert_eq!(std::fs::read_to_string(&victim).expect("read"), "keep me");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "old");
    }

    #[cfg(unix)]
    #[test]
    fn an_owner_only_file_is_readable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("a scratch directory");
        let path = dir.path().join("ring.json");
        let temporary = temporary_beside(&path, ".ring.json.", ".new");
        replace(&path, &temporary, b"secret", Access::OwnerOnly).expect("replaced");
        let mode = std::fs::metadata(&path).expect("metadata").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
