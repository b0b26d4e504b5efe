//! Config files written so that an app sharing their directory cannot redirect the write.
//!
//! The entrypoint often runs as root while the app (or an exec session) can write the directory
//! a config file lives in. So after the directory is opened, every step goes through its fd,
//! never through a path the app could swap for a symlink between two steps:
//!
//! - the directory is opened with `O_DIRECTORY|O_NOFOLLOW`: if its last component is a symlink,
//!   the write is refused. Symlinks higher up the path (`/var/run` → `/run`) are followed, as
//!   `mkdir -p` follows them: images commonly have them, and they live in directories the app
//!   should not be able to write. An app that can write the file's own directory is the case
//!   guarded here; one that can write its parent's parent could already replace the tree.
//! - the data goes to a temp file with a random name, created with `O_CREAT|O_EXCL|O_NOFOLLOW`:
//!   a file or symlink planted under any name is never opened, so never written through;
//! - its mode is set with `fchmod` on the fd (exact, whatever the umask), the data fsynced;
//! - `renameat` puts it in place: a rename replaces a symlink at the target name itself and
//!   never follows it; then the directory is fsynced so the rename survives a crash.
//!
//! Missing parent directories are created first (by path, like `mkdir -p`: a directory that does
//! not exist yet is not one an app could have planted anything in).

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

/// Attempts at a fresh random temp name before giving up: with 64 random bits a clash means
/// someone keeps planting names, and a few tries make that visible instead of spinning.
const TEMP_NAME_TRIES: usize = 8;

/// Writes `contents` to the absolute `path` with exactly `mode` (permission and setuid/setgid/
/// sticky bits), atomically: readers see the old file or the new one, never a mix. Parent
/// directories are created. The error is one line naming the path.
pub fn write(path: &str, mode: u32, contents: &[u8]) -> Result<(), String> {
    let (dir, name) = split(path)?;
    let dirfd = open_dir(dir, true)
        .map_err(|e| format!("writing {path}: {e}"))?
        .expect("created if missing");
    let (tmp, file) = create_temp(&dirfd).map_err(|e| {
        format!(
            "writing {path}: creating a temp file in {}: {}",
            dir.display(),
            os(e)
        )
    })?;
    let written = fill(&file, mode, contents).and_then(|()| {
        rustix::fs::renameat(&dirfd, &tmp, &dirfd, name).map_err(|e| ("putting it in place", e))
    });
    drop(file);
    if let Err((what, e)) = written {
        let _ = rustix::fs::unlinkat(&dirfd, &tmp, AtFlags::empty());
        return Err(format!("writing {path}: {what}: {}", os(e)));
    }
    match rustix::fs::fsync(&dirfd) {
        // Some filesystems cannot sync a directory; the rename is done all the same.
        Ok(()) | Err(Errno::INVAL) => Ok(()),
        Err(e) => Err(format!("writing {path}: syncing its directory: {}", os(e))),
    }
}

/// Writes every file of a config snapshot and removes the ones no longer configured; stops at
/// the first failure.
pub fn apply(write: &[waypost_proto::ConfigFile], remove: &[String]) -> Result<(), String> {
    for f in write {
        self::write(&f.path, f.mode, &f.contents)?;
    }
    for path in remove {
        self::remove(path)?;
    }
    Ok(())
}

/// Removes the file at the absolute `path` (a symlink there is removed itself, not followed);
/// a file or directory already gone is fine.
pub fn remove(path: &str) -> Result<(), String> {
    let (dir, name) = split(path)?;
    let Some(dirfd) = open_dir(dir, false).map_err(|e| format!("removing {path}: {e}"))? else {
        return Ok(());
    };
    match rustix::fs::unlinkat(&dirfd, name, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(format!("removing {path}: {}", os(e))),
    }
}

/// The directory and file name of an absolute file path.
fn split(path: &str) -> Result<(&Path, &std::ffi::OsStr), String> {
    let p = Path::new(path);
    match (p.parent(), p.file_name(), p.is_absolute()) {
        (Some(dir), Some(name), true) => Ok((dir, name)),
        _ => Err(format!("{path:?} is not an absolute file path")),
    }
}

/// Opens `dir` without following a symlink in its last component; `None` if it does not exist
/// and `create` is false.
fn open_dir(dir: &Path, create: bool) -> Result<Option<OwnedFd>, String> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    match rustix::fs::open(dir, flags, Mode::empty()) {
        Ok(fd) => return Ok(Some(fd)),
        Err(Errno::NOENT) if !create => return Ok(None),
        Err(Errno::NOENT) => {}
        Err(e) => return Err(dir_error(dir, e)),
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("creating the directory {}: {e}", dir.display()))?;
    rustix::fs::open(dir, flags, Mode::empty())
        .map(Some)
        .map_err(|e| dir_error(dir, e))
}

fn dir_error(dir: &Path, e: Errno) -> String {
    // O_NOFOLLOW reports a symlink as ELOOP (ENOTDIR with O_DIRECTORY on some kernels); say
    // which it is, since "too many levels of symbolic links" would puzzle anyone.
    let is_link = matches!(e, Errno::LOOP | Errno::NOTDIR)
        && rustix::fs::lstat(dir)
            .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Symlink);
    if is_link {
        format!(
            "the directory {} is a symbolic link; refusing to write through it",
            dir.display()
        )
    } else {
        format!("opening the directory {}: {}", dir.display(), os(e))
    }
}

/// Creates a new temp file with a random name in `dirfd`, open for writing, mode 0600 for now.
fn create_temp(dirfd: &OwnedFd) -> Result<(String, OwnedFd), Errno> {
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mut last = Errno::EXIST;
    for _ in 0..TEMP_NAME_TRIES {
        let mut r = [0u8; 8];
        super::random::fill(&mut r)
            .map_err(|e| e.raw_os_error().map_or(Errno::IO, Errno::from_raw_os_error))?;
        let name = format!(".waypost-tmp.{:016x}", u64::from_ne_bytes(r));
        match rustix::fs::openat(dirfd, &name, flags, Mode::from_raw_mode(0o600)) {
            Ok(fd) => return Ok((name, fd)),
            Err(e @ Errno::EXIST) => last = e,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

/// Sets the exact mode of the open temp file, writes `contents`, and syncs it.
fn fill(file: &OwnedFd, mode: u32, contents: &[u8]) -> Result<(), (&'static str, Errno)> {
    // Mode first: a file meant to be private is never readable with a looser mode.
    rustix::fs::fchmod(file, Mode::from_raw_mode(mode & 0o7777))
        .map_err(|e| ("setting its mode", e))?;
    let mut rest = contents;
    while !rest.is_empty() {
        match rustix::io::write(file.as_fd(), rest) {
            Ok(0) => return Err(("writing it", Errno::IO)),
            Ok(n) => rest = &rest[n..],
            Err(Errno::INTR) => {}
            Err(e) => return Err(("writing it", e)),
        }
    }
    rustix::fs::fsync(file).map_err(|e| ("syncing it", e))
}

/// An errno as the familiar message ("No such file or directory (os error 2)").
fn os(e: Errno) -> std::io::Error {
    e.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, symlink};
    use std::path::PathBuf;

    /// A private directory under the system temp dir, removed on drop.
    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Dir {
            let p = std::env::temp_dir().join(format!(
                "waypost-files-{name}-{}-{:x}",
                std::process::id(),
                super::super::random::u64()
            ));
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
        fn path(&self, rel: &str) -> String {
            self.0.join(rel).to_str().unwrap().to_owned()
        }
        /// Names in the directory (to see no temp file is left behind).
        fn names(&self, rel: &str) -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(self.0.join(rel))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            v.sort();
            v
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn mode_of(path: &str) -> u32 {
        std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn writes_with_exact_mode_creating_parents_and_leaves_no_temp() {
        let d = Dir::new("basic");
        let f = d.path("a/b/app.conf");
        write(&f, 0o640, b"one").unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"one");
        assert_eq!(mode_of(&f), 0o640);
        // Replacing: new contents, new mode (looser and stricter than 0600 both exact).
        write(&f, 0o604, b"two").unwrap();
        assert_eq!(
            (std::fs::read(&f).unwrap(), mode_of(&f)),
            (b"two".to_vec(), 0o604)
        );
        write(&f, 0o400, b"").unwrap();
        assert_eq!(
            (std::fs::read(&f).unwrap(), mode_of(&f)),
            (Vec::new(), 0o400)
        );
        assert_eq!(d.names("a/b"), ["app.conf"]);
    }

    #[test]
    fn a_symlink_at_the_target_is_replaced_not_followed() {
        let d = Dir::new("target-link");
        std::fs::write(d.path("victim"), "precious").unwrap();
        let victim_mode = mode_of(&d.path("victim"));
        std::fs::create_dir(d.path("conf")).unwrap();
        symlink(d.path("victim"), d.path("conf/app.conf")).unwrap();
        // And the fixed temp name an older version used, planted as a symlink too.
        symlink(d.path("victim"), d.path("conf/.app.conf.waypost-tmp")).unwrap();
        write(&d.path("conf/app.conf"), 0o600, b"config").unwrap();
        assert_eq!(
            std::fs::read_to_string(d.path("victim")).unwrap(),
            "precious"
        );
        let meta = std::fs::symlink_metadata(d.path("conf/app.conf")).unwrap();
        assert!(
            meta.file_type().is_file(),
            "the target is a regular file now"
        );
        assert_eq!(std::fs::read(d.path("conf/app.conf")).unwrap(), b"config");
        assert_eq!(
            mode_of(&d.path("victim")),
            victim_mode,
            "the victim's mode is untouched too"
        );
    }

    #[test]
    fn a_symlinked_directory_is_refused() {
        let d = Dir::new("dir-link");
        std::fs::create_dir(d.path("elsewhere")).unwrap();
        symlink(d.path("elsewhere"), d.path("conf")).unwrap();
        let e = write(&d.path("conf/app.conf"), 0o600, b"x").unwrap_err();
        assert!(
            e.contains("symbolic link") && e.contains(&d.path("conf/app.conf")),
            "{e}"
        );
        assert!(
            d.names("elsewhere").is_empty(),
            "nothing written through the link"
        );
        // Removing through it is refused the same way.
        std::fs::write(d.path("elsewhere/app.conf"), "keep").unwrap();
        let e = remove(&d.path("conf/app.conf")).unwrap_err();
        assert!(e.contains("symbolic link"), "{e}");
        assert_eq!(
            std::fs::read_to_string(d.path("elsewhere/app.conf")).unwrap(),
            "keep"
        );
        // A dangling symlink as the directory: refused too, not "created".
        symlink(d.path("nowhere"), d.path("dangling")).unwrap();
        let e = write(&d.path("dangling/app.conf"), 0o600, b"x").unwrap_err();
        assert!(e.contains("dangling"), "{e}");
        assert!(!Path::new(&d.path("nowhere")).exists());
    }

    #[test]
    fn intermediate_symlinks_are_followed() {
        let d = Dir::new("intermediate");
        std::fs::create_dir_all(d.path("real/conf")).unwrap();
        symlink(d.path("real"), d.path("run")).unwrap();
        write(&d.path("run/conf/app.conf"), 0o644, b"x").unwrap();
        assert_eq!(std::fs::read(d.path("real/conf/app.conf")).unwrap(), b"x");
    }

    #[test]
    fn remove_unlinks_the_name_only() {
        let d = Dir::new("remove");
        std::fs::write(d.path("victim"), "precious").unwrap();
        symlink(d.path("victim"), d.path("link.conf")).unwrap();
        remove(&d.path("link.conf")).unwrap();
        assert!(std::fs::symlink_metadata(d.path("link.conf")).is_err());
        assert_eq!(
            std::fs::read_to_string(d.path("victim")).unwrap(),
            "precious"
        );
        // Already gone, or its directory never existed: nothing to do.
        remove(&d.path("link.conf")).unwrap();
        remove(&d.path("no/such/dir/x.conf")).unwrap();
    }

    #[test]
    fn bad_paths_and_failures_are_clear_and_leave_no_temp() {
        let d = Dir::new("errors");
        for bad in ["relative/x", "/", ""] {
            let e = write(bad, 0o600, b"x").unwrap_err();
            assert!(e.contains("not an absolute file path"), "{bad:?}: {e}");
        }
        // The target name is a directory: the rename fails, the temp file is cleaned up.
        std::fs::create_dir_all(d.path("conf/app.conf")).unwrap();
        std::fs::write(d.path("conf/app.conf/inner"), "x").unwrap();
        let e = write(&d.path("conf/app.conf"), 0o600, b"x").unwrap_err();
        assert!(
            e.contains(&d.path("conf/app.conf")) && e.contains("putting it in place"),
            "{e}"
        );
        assert_eq!(d.names("conf"), ["app.conf"], "no temp file left");
    }
}
