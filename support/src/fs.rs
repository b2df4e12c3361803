//! Atomic file writes: a temporary sibling, synced, renamed over the destination, and the
//! directory synced, so a reader (or a restart after a crash) sees either the previous file or
//! the new one in full.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// A file being written in place of `path`: the bytes go to a temporary sibling, which
/// [`AtomicFile::commit`] renames over `path`. Dropped without a commit, the temporary is
/// removed and `path` is untouched.
#[derive(Debug)]
pub struct AtomicFile {
    path: PathBuf,
    temporary: PathBuf,
    file: Option<File>,
    committed: bool,
}

impl AtomicFile {
    /// Creates the temporary sibling of `path`: `.STEM.tmp-PID.EXT`, in the same directory (a
    /// rename does not cross file systems) and with the same extension (for writers that pick
    /// a format from it).
    pub fn create(path: &Path) -> io::Result<Self> {
        let mut this = Self::reserve(path)?;
        this.file = Some(File::create(&this.temporary)?);
        Ok(this)
    }

    /// As [`AtomicFile::create`], for secrets: on Unix the temporary is created mode 0600, so
    /// the bytes are never readable by others, not even between the write and a chmod.
    pub fn create_private(path: &Path) -> io::Result<Self> {
        let mut this = Self::reserve(path)?;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        // A temporary left by a crashed writer of the same pid may carry another mode.
        match std::fs::remove_file(&this.temporary) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        this.file = Some(options.open(&this.temporary)?);
        Ok(this)
    }

    /// Names the temporary without creating it, for writers that open the path themselves
    /// (they write [`AtomicFile::temporary`], then the caller commits).
    pub fn reserve(path: &Path) -> io::Result<Self> {
        let name = path.file_name().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} names no file", path.display()),
            )
        })?;
        let name = Path::new(name);
        let mut temporary = OsString::from(".");
        temporary.push(name.file_stem().unwrap_or(name.as_os_str()));
        temporary.push(format!(".tmp-{}", std::process::id()));
        if let Some(ext) = name.extension() {
            temporary.push(".");
            temporary.push(ext);
        }
        Ok(Self {
            path: path.to_owned(),
            temporary: path.with_file_name(temporary),
            file: None,
            committed: false,
        })
    }

    /// Where the bytes go until the commit.
    pub fn temporary(&self) -> &Path {
        &self.temporary
    }

    /// The open temporary (created by [`AtomicFile::create`]).
    pub fn file(&mut self) -> io::Result<&mut File> {
        self.file.as_mut().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "the temporary was reserved, not created",
            )
        })
    }

    /// Syncs the temporary, renames it over the destination and syncs the directory (the
    /// rename is durable only once the directory entry is on disk).
    pub fn commit(mut self) -> io::Result<()> {
        let file = match self.file.take() {
            Some(f) => f,
            None => File::open(&self.temporary)?,
        };
        file.sync_all()?;
        drop(file);
        std::fs::rename(&self.temporary, &self.path)?;
        self.committed = true;
        #[cfg(unix)]
        {
            let dir = match self.path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file()?.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file()?.flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.committed {
            self.file = None;
            // Best effort: the temporary may not even exist.
            let _ = std::fs::remove_file(&self.temporary);
        }
    }
}

/// Writes `bytes` to `path` atomically ([`AtomicFile`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = AtomicFile::create(path)?;
    file.write_all(bytes)?;
    file.commit()
}

/// Writes a secret to `path` atomically, readable by its owner only
/// ([`AtomicFile::create_private`]), whatever mode an earlier file had.
pub fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = AtomicFile::create_private(path)?;
    file.write_all(bytes)?;
    file.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_replaces_and_a_drop_leaves_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.bin");
        write_atomic(&path, b"one").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
        {
            let mut f = AtomicFile::create(&path).unwrap();
            f.write_all(b"half-written").unwrap();
            assert!(f.temporary().exists());
            assert_eq!(f.temporary().extension().unwrap(), "bin");
        }
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary left behind");
        assert!(write_atomic(Path::new("/"), b"x").is_err());
    }

    #[cfg(unix)]
    #[test]
    fn a_private_file_is_owner_only_even_over_a_public_one() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.token");
        write_atomic(&path, b"public").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&path, b"secret").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"secret");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
