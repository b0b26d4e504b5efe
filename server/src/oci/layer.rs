//! The one layer `waypost inject` adds: a tar holding `/waypost-entrypoint`, gzip'd.
//!
//! Reproducible by construction: one ustar entry with fixed owner (0:0), mode (0755) and mtime
//! ([`LAYER_MTIME`]), and a gzip header with mtime 0 and no file name; the same binary always
//! gives the same diff_id and the same blob digest.

use super::sha256_digest;
use anyhow::Result;
use flate2::{Compression, GzBuilder};
use std::io::Write as _;

/// The file's modification time in the layer (the Unix epoch: any fixed value would do).
pub const LAYER_MTIME: u64 = 0;

/// Path of the entrypoint inside the layer (tar names carry no leading `/`).
const TAR_NAME: &str = "waypost-entrypoint";

pub struct BuiltLayer {
    /// The uncompressed tar; its sha256 is the diff_id.
    pub tar: Vec<u8>,
    /// The gzip'd tar: the blob.
    pub gz: Vec<u8>,
    pub diff_id: String,
    pub digest: String,
}

/// A tar with one regular file, fixed metadata.
pub fn single_file_tar(name: &str, mode: u32, content: &[u8]) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(LAYER_MTIME);
    h.set_size(content.len() as u64);
    b.append_data(&mut h, name, content)?;
    Ok(b.into_inner()?)
}

/// gzip with a reproducible header (mtime 0, no name), best compression: the layer is built
/// once per image and pulled many times.
pub fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    let mut enc = GzBuilder::new()
        .mtime(0)
        .operating_system(255)
        .write(Vec::new(), Compression::best());
    enc.write_all(data)?;
    Ok(enc.finish()?)
}

pub fn entrypoint_layer(binary: &[u8]) -> Result<BuiltLayer> {
    let tar = single_file_tar(TAR_NAME, 0o755, binary)?;
    let gz = gzip(&tar)?;
    Ok(BuiltLayer {
        diff_id: sha256_digest(&tar),
        digest: sha256_digest(&gz),
        tar,
        gz,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;

    #[test]
    fn layer_is_reproducible_and_holds_the_binary() {
        let bin = b"\x7fELF pretend binary".repeat(100);
        let a = entrypoint_layer(&bin).unwrap();
        let b = entrypoint_layer(&bin).unwrap();
        assert_eq!(a.gz, b.gz);
        assert_eq!(a.diff_id, b.diff_id);
        assert_eq!(a.diff_id, sha256_digest(&a.tar));
        assert_eq!(a.digest, sha256_digest(&a.gz));
        assert!(a.gz.len() < a.tar.len());

        // gunzip gives back the tar; the tar has exactly our file with our metadata.
        let mut un = Vec::new();
        flate2::read::GzDecoder::new(&a.gz[..])
            .read_to_end(&mut un)
            .unwrap();
        assert_eq!(un, a.tar);
        let mut ar = tar::Archive::new(&a.tar[..]);
        let mut n = 0;
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            n += 1;
            assert_eq!(e.path().unwrap().to_str(), Some("waypost-entrypoint"));
            let h = e.header();
            assert_eq!(h.mode().unwrap(), 0o755);
            assert_eq!(h.uid().unwrap(), 0);
            assert_eq!(h.gid().unwrap(), 0);
            assert_eq!(h.mtime().unwrap(), LAYER_MTIME);
            let mut content = Vec::new();
            e.read_to_end(&mut content).unwrap();
            assert_eq!(content, bin);
        }
        assert_eq!(n, 1);
    }
}
