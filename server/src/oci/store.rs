//! Where a source image's files are: an OCI layout directory, or an uncompressed tarball
//! (oci-archive, docker-archive) read in place.
//!
//! A tarball is indexed once (name → byte range inside the file, symlinks and hard links
//! recorded), then every file is read straight from its range: nothing is extracted to disk
//! and nothing bigger than a JSON document is held in memory.

use anyhow::{Context as _, Result, bail};
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};

/// Largest JSON document (index, manifest, config, manifest.json) we read into memory. Real
/// configs are a few KiB; a history-heavy one is still far below this.
pub const MAX_JSON: u64 = 16 << 20;

/// How many symlink/hard-link hops we follow inside a tarball before calling it a loop.
const MAX_LINK_HOPS: usize = 8;

pub enum Entry {
    File {
        offset: u64,
        size: u64,
    },
    /// A symlink or hard link; the target is already a normalised name inside the archive.
    Link(String),
}

pub enum Store {
    /// No files: an image built in memory (every blob is [`super::BlobSrc::Memory`]).
    Nothing,
    Dir(PathBuf),
    Tar {
        /// The tar that is read: the source itself, or its decompressed copy.
        file: PathBuf,
        entries: HashMap<String, Entry>,
        /// A gzip'd source: (the source's path, the decompressed copy, removed on drop).
        gunzipped: Option<(PathBuf, tempfile::TempPath)>,
    },
}

/// Normalises an archive-relative name: strips `./` and leading `/`, resolves `.` and `..`.
/// `None` if it climbs above the root.
pub fn normalize(name: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for p in name.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    Some(parts.join("/"))
}

/// Decompresses a gzip'd file (one or more members, as gzip and pigz write) into a temporary
/// file in the same directory (same disk as the source; /tmp may be a small tmpfs), or in the
/// temp directory if that one is not writable.
fn gunzip_to_temp(path: &Path) -> Result<tempfile::TempPath> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".waypost-gunzip-")
        .tempfile_in(dir)
        .or_else(|_| {
            tempfile::Builder::new()
                .prefix("waypost-gunzip-")
                .tempfile()
        })
        .context("creating a temporary file to decompress into")?;
    let src = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut gz = flate2::read::MultiGzDecoder::new(std::io::BufReader::new(src));
    std::io::copy(&mut gz, tmp.as_file_mut())
        .with_context(|| format!("decompressing {} (gzip)", path.display()))?;
    Ok(tmp.into_temp_path())
}

impl Store {
    pub fn dir(path: &Path) -> Result<Store> {
        if !path.is_dir() {
            bail!("{}: not a directory", path.display());
        }
        Ok(Store::Dir(path.to_path_buf()))
    }

    /// Indexes a tarball; a gzip'd one (`docker save IMAGE | gzip`) is first decompressed into
    /// a temporary file next to it (else in the temp directory), streamed, never into memory.
    pub fn tar(path: &Path) -> Result<Store> {
        let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut magic = [0u8; 4];
        let n = f.read(&mut magic)?;
        if n >= 2 && magic[..2] == [0x1f, 0x8b] {
            let plain = gunzip_to_temp(path)?;
            let mut store = Store::tar(&plain)?;
            if let Store::Tar { gunzipped, .. } = &mut store {
                *gunzipped = Some((path.to_path_buf(), plain));
            }
            return Ok(store);
        }
        if n >= 4 && magic == [0x28, 0xb5, 0x2f, 0xfd] {
            bail!(
                "{} is zstd-compressed; decompress it first (zstd -d), image archives are plain tar",
                path.display()
            );
        }
        f.seek(SeekFrom::Start(0))?;
        let mut archive = tar::Archive::new(f);
        let mut entries = HashMap::new();
        let what = || format!("reading the tarball {}", path.display());
        for e in archive.entries_with_seek().with_context(what)? {
            let e = e.with_context(what)?;
            let raw = e.path().with_context(what)?.to_string_lossy().into_owned();
            let Some(name) = normalize(&raw) else {
                continue; // climbs out of the archive: never a file we look for
            };
            let ty = e.header().entry_type();
            if ty.is_file() {
                entries.insert(
                    name,
                    Entry::File {
                        offset: e.raw_file_position(),
                        size: e.size(),
                    },
                );
            } else if ty.is_symlink() || ty.is_hard_link() {
                let Some(target) = e.link_name().with_context(what)? else {
                    continue;
                };
                let target = target.to_string_lossy().into_owned();
                // Symlinks are relative to the link's directory; hard links to the archive root.
                let full = if ty.is_symlink() && !target.starts_with('/') {
                    match name.rsplit_once('/') {
                        Some((dir, _)) => format!("{dir}/{target}"),
                        None => target,
                    }
                } else {
                    target
                };
                if let Some(t) = normalize(&full) {
                    entries.insert(name, Entry::Link(t));
                }
            }
        }
        Ok(Store::Tar {
            file: path.to_path_buf(),
            entries,
            gunzipped: None,
        })
    }

    /// The source's path if it was gzip'd (and is read from a decompressed copy).
    pub fn gunzipped_from(&self) -> Option<&Path> {
        match self {
            Store::Tar {
                gunzipped: Some((src, _)),
                ..
            } => Some(src),
            _ => None,
        }
    }

    fn resolve(entries: &HashMap<String, Entry>, name: &str) -> Option<(u64, u64)> {
        let mut name = normalize(name)?;
        for _ in 0..MAX_LINK_HOPS {
            match entries.get(&name)? {
                Entry::File { offset, size } => return Some((*offset, *size)),
                Entry::Link(t) => name = t.clone(),
            }
        }
        None
    }

    pub fn exists(&self, name: &str) -> bool {
        match self {
            Store::Nothing => false,
            Store::Dir(d) => normalize(name).is_some_and(|n| d.join(n).is_file()),
            Store::Tar { entries, .. } => Self::resolve(entries, name).is_some(),
        }
    }

    /// Opens a file of the image; returns a reader and its size.
    pub fn open(&self, name: &str) -> Result<(Box<dyn Read + Send>, u64)> {
        match self {
            Store::Nothing => bail!("an in-memory image has no file {name:?}"),
            Store::Dir(d) => {
                let n = normalize(name).with_context(|| format!("bad file name {name:?}"))?;
                let p = d.join(n);
                let f = File::open(&p).with_context(|| format!("opening {}", p.display()))?;
                let size = f.metadata()?.len();
                Ok((Box::new(f), size))
            }
            Store::Tar { file, entries, .. } => {
                let (offset, size) = Self::resolve(entries, name)
                    .with_context(|| format!("{} has no file {name:?}", file.display()))?;
                let mut f = File::open(file)?;
                f.seek(SeekFrom::Start(offset))?;
                Ok((Box::new(f.take(size)), size))
            }
        }
    }

    /// Reads a (JSON) file whole, refusing anything over [`MAX_JSON`].
    pub fn read_small(&self, name: &str) -> Result<Vec<u8>> {
        let (mut r, size) = self.open(name)?;
        if size > MAX_JSON {
            bail!("{name} is {size} bytes, more than any image metadata file should be");
        }
        let mut v = Vec::with_capacity(size as usize);
        r.read_to_end(&mut v)?;
        Ok(v)
    }

    pub fn describe(&self) -> String {
        match self {
            Store::Nothing => "(in memory)".to_string(),
            Store::Dir(d) => d.display().to_string(),
            Store::Tar {
                gunzipped: Some((src, _)),
                ..
            } => src.display().to_string(),
            Store::Tar { file, .. } => file.display().to_string(),
        }
    }
}
