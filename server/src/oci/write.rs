//! Writing an [`Image`] in a transport's own format, atomically: everything goes to a
//! temporary sibling of the destination, which is renamed into place only when complete.

use super::read::{blob_name, with_default_tag};
use super::{BlobSrc, Compression, Flavor, Image, ImageRef, Layer, Transport, digest_hex, media};
use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{BufWriter, Read, Write as _};
use std::path::{Path, PathBuf};

/// Where files of the output go: a directory tree or a tarball.
trait Sink {
    fn dir(&mut self, name: &str) -> Result<()>;
    fn file(&mut self, name: &str, size: u64, r: &mut dyn Read) -> Result<()>;
    fn symlink(&mut self, name: &str, target: &str) -> Result<()>;
    fn bytes(&mut self, name: &str, b: &[u8]) -> Result<()> {
        self.file(name, b.len() as u64, &mut &b[..])
    }
}

struct DirSink(PathBuf);

impl Sink for DirSink {
    fn dir(&mut self, name: &str) -> Result<()> {
        fs::create_dir_all(self.0.join(name))?;
        Ok(())
    }
    fn file(&mut self, name: &str, size: u64, r: &mut dyn Read) -> Result<()> {
        let p = self.0.join(name);
        let mut f =
            BufWriter::new(File::create(&p).with_context(|| format!("creating {}", p.display()))?);
        let n = std::io::copy(&mut r.take(size), &mut f)?;
        if n != size {
            bail!("{name}: source ended after {n} of {size} bytes");
        }
        f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        Ok(())
    }
    fn symlink(&mut self, name: &str, target: &str) -> Result<()> {
        std::os::unix::fs::symlink(target, self.0.join(name))?;
        Ok(())
    }
}

struct TarSink(tar::Builder<BufWriter<File>>);

/// Fixed header metadata, so the same image always gives the same tarball.
fn header(ty: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(ty);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(size);
    h
}

impl Sink for TarSink {
    fn dir(&mut self, name: &str) -> Result<()> {
        let mut h = header(tar::EntryType::Directory, 0o755, 0);
        self.0
            .append_data(&mut h, format!("{name}/"), std::io::empty())?;
        Ok(())
    }
    fn file(&mut self, name: &str, size: u64, r: &mut dyn Read) -> Result<()> {
        let mut h = header(tar::EntryType::Regular, 0o644, size);
        let mut counted = Counted {
            r: r.take(size),
            n: 0,
        };
        self.0.append_data(&mut h, name, &mut counted)?;
        if counted.n != size {
            bail!("{name}: source ended after {} of {size} bytes", counted.n);
        }
        Ok(())
    }
    fn symlink(&mut self, name: &str, target: &str) -> Result<()> {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        self.0.append_link(&mut h, name, target)?;
        Ok(())
    }
}

struct Counted<R> {
    r: R,
    n: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        let n = self.r.read(b)?;
        self.n += n as u64;
        Ok(n)
    }
}

fn absolute(p: &Path) -> Result<PathBuf> {
    if let Ok(c) = fs::canonicalize(p) {
        return Ok(c);
    }
    let name = p
        .file_name()
        .with_context(|| format!("{}: not a file name", p.display()))?;
    let parent = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let parent = fs::canonicalize(parent)
        .with_context(|| format!("the directory of {} does not exist", p.display()))?;
    Ok(parent.join(name))
}

/// Refuses a destination that would overwrite the source or something that is not an image.
pub fn check_destination(src: &ImageRef, dst: &ImageRef) -> Result<()> {
    let s = fs::canonicalize(&src.path)
        .with_context(|| format!("{}: no such file or directory", src.path.display()))?;
    let d = absolute(&dst.path)?;
    if s == d {
        bail!(
            "DST is SRC ({}): `waypost inject` never modifies its source; write to a new path",
            d.display()
        );
    }
    if s.is_dir() && d.starts_with(&s) {
        bail!(
            "DST {} is inside the source layout {}; write it elsewhere",
            d.display(),
            s.display()
        );
    }
    if let Ok(meta) = fs::symlink_metadata(&d) {
        match dst.transport {
            Transport::Oci => {
                let is_layout = meta.is_dir()
                    && (d.join("oci-layout").exists() || fs::read_dir(&d)?.next().is_none());
                if !is_layout {
                    bail!(
                        "DST {} exists and is not an OCI layout directory; refusing to replace it",
                        d.display()
                    );
                }
            }
            Transport::OciArchive | Transport::DockerArchive => {
                if !meta.is_file() {
                    bail!("DST {} exists and is not a regular file", d.display());
                }
            }
        }
    }
    Ok(())
}

/// Removes a temporary output unless committed.
struct Temp {
    path: PathBuf,
    armed: bool,
}

impl Drop for Temp {
    fn drop(&mut self) {
        if self.armed {
            let _ = fs::remove_dir_all(&self.path);
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Writes `img` to `dst` (replacing an existing DST only once the new one is complete).
pub fn write(img: &Image, dst: &ImageRef) -> Result<()> {
    let d = absolute(&dst.path)?;
    let parent = d
        .parent()
        .context("DST has no parent directory")?
        .to_path_buf();
    let fname = d
        .file_name()
        .context("DST has no file name")?
        .to_string_lossy()
        .into_owned();
    let mut tmp = Temp {
        path: parent.join(format!(".{fname}.waypost-{}.tmp", std::process::id())),
        armed: true,
    };
    let _ = fs::remove_dir_all(&tmp.path);
    let _ = fs::remove_file(&tmp.path);
    let ctx = || format!("writing {dst}");
    match dst.transport {
        Transport::Oci => {
            fs::create_dir(&tmp.path).with_context(ctx)?;
            let mut sink = DirSink(tmp.path.clone());
            write_oci_layout(img, &mut sink, oci_name(img, dst).as_deref()).with_context(ctx)?;
            if d.exists() {
                let old = parent.join(format!(".{fname}.waypost-{}.old", std::process::id()));
                fs::rename(&d, &old).with_context(ctx)?;
                fs::rename(&tmp.path, &d).with_context(ctx)?;
                let _ = fs::remove_dir_all(&old);
            } else {
                fs::rename(&tmp.path, &d).with_context(ctx)?;
            }
        }
        Transport::OciArchive | Transport::DockerArchive => {
            let f = File::create(&tmp.path).with_context(ctx)?;
            let mut sink = TarSink(tar::Builder::new(BufWriter::new(f)));
            if dst.transport == Transport::OciArchive {
                write_oci_layout(img, &mut sink, oci_name(img, dst).as_deref())
                    .with_context(ctx)?;
            } else {
                write_docker_archive(img, &mut sink, docker_name(img, dst)?).with_context(ctx)?;
            }
            let mut w = sink.0.into_inner().with_context(ctx)?;
            w.flush()?;
            w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            fs::rename(&tmp.path, &d).with_context(ctx)?;
        }
    }
    tmp.armed = false;
    Ok(())
}

fn oci_name(img: &Image, dst: &ImageRef) -> Option<String> {
    dst.tag.clone().or_else(|| img.name.clone())
}

/// RepoTags for a docker-archive: DST's NAME[:TAG], else the source's name if it is a full
/// `name:tag` reference (an OCI ref name is often a bare tag like `latest`, which is not).
fn docker_name(img: &Image, dst: &ImageRef) -> Result<Option<String>> {
    if let Some(t) = &dst.tag {
        if t.contains('@') {
            bail!(
                "docker-archive:{}:{t}: a digest reference cannot name an image in an archive",
                dst.path.display()
            );
        }
        return Ok(Some(with_default_tag(t)));
    }
    Ok(img
        .name
        .as_ref()
        .filter(|n| {
            let last = n.rsplit('/').next().unwrap_or(n);
            last.contains(':') && !n.contains('@')
        })
        .cloned())
}

fn open_blob<'a>(img: &'a Image, src: &'a BlobSrc) -> Result<(Box<dyn Read + Send + 'a>, u64)> {
    match src {
        BlobSrc::Store(name) => img.store.open(name),
        BlobSrc::Memory(b) => Ok((Box::new(&b[..]), b.len() as u64)),
    }
}

#[cfg(test)]
pub(super) fn open_blob_for_test<'a>(
    img: &'a Image,
    l: &'a Layer,
) -> (Box<dyn Read + Send + 'a>, u64) {
    open_blob(img, &l.src).unwrap()
}

/// The manifest to write into an OCI layout: the source's bytes if nothing changed, else a new
/// one (keeping the source manifest's other fields and its layer descriptors).
pub(super) fn manifest_bytes(img: &Image) -> Result<(Vec<u8>, String)> {
    if let (false, Some(m)) = (img.changed, &img.manifest) {
        return Ok((m.bytes.clone(), m.media_type.clone()));
    }
    let mt = match img.flavor {
        Flavor::Oci => media::OCI_MANIFEST,
        Flavor::Docker => media::DOCKER_MANIFEST,
    };
    let mut m = img
        .manifest
        .as_ref()
        .map(|m| m.value.clone())
        .unwrap_or_else(|| json!({}));
    let layers: Vec<Value> = img
        .layers
        .iter()
        .map(|l: &Layer| {
            l.descriptor.clone().unwrap_or_else(
                || json!({ "mediaType": l.compression.media_type(img.flavor), "digest": l.digest, "size": l.size }),
            )
        })
        .collect();
    m["schemaVersion"] = json!(2);
    m["mediaType"] = json!(mt);
    m["config"] = json!({
        "mediaType": img.config_media_type,
        "digest": img.config_digest(),
        "size": img.config.len(),
    });
    m["layers"] = json!(layers);
    Ok((serde_json::to_vec(&m)?, mt.to_string()))
}

fn write_oci_layout(img: &Image, sink: &mut dyn Sink, name: Option<&str>) -> Result<()> {
    sink.bytes("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    sink.dir("blobs")?;
    sink.dir("blobs/sha256")?;
    let mut written = HashSet::new();
    for l in &img.layers {
        if written.insert(l.digest.clone()) {
            let (mut r, size) = open_blob(img, &l.src)?;
            if size != l.size {
                bail!(
                    "layer {} is {size} bytes, the manifest says {}",
                    l.digest,
                    l.size
                );
            }
            sink.file(&blob_name(&l.digest)?, size, &mut r)?;
        }
    }
    let cdigest = img.config_digest();
    if written.insert(cdigest.clone()) {
        sink.bytes(&blob_name(&cdigest)?, &img.config)?;
    }
    let (mbytes, mt) = manifest_bytes(img)?;
    let mdigest = super::sha256_digest(&mbytes);
    if written.insert(mdigest.clone()) {
        sink.bytes(&blob_name(&mdigest)?, &mbytes)?;
    }
    let mut desc = json!({ "mediaType": mt, "digest": mdigest, "size": mbytes.len() });
    if let Some(n) = name {
        desc["annotations"] = json!({ media::REF_NAME: n });
    }
    let index = json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_INDEX,
        "manifests": [desc],
    });
    sink.bytes("index.json", &serde_json::to_vec(&index)?)
}

/// docker-archive as `docker save` and skopeo write it: uncompressed layers named by their
/// diff_id, the config, manifest.json, and the legacy per-layer directories + `repositories`
/// that older loaders read.
fn write_docker_archive(img: &Image, sink: &mut dyn Sink, repo_tag: Option<String>) -> Result<()> {
    let cfg = img.config_json()?;
    let diff_ids: Vec<String> = cfg["rootfs"]["diff_ids"]
        .as_array()
        .context("the config has no rootfs.diff_ids")?
        .iter()
        .map(|d| {
            d.as_str()
                .map(str::to_string)
                .context("a diff_id is not a string")
        })
        .collect::<Result<_>>()?;
    if diff_ids.len() != img.layers.len() {
        bail!(
            "the config lists {} layers, the image has {}",
            diff_ids.len(),
            img.layers.len()
        );
    }
    let mut files = Vec::new();
    let mut written = HashSet::new();
    for (l, diff_id) in img.layers.iter().zip(&diff_ids) {
        let name = match l.compression {
            Compression::None | Compression::Zstd => {
                // Uncompressed: the blob is the tar. zstd: no decompressor here, so the blob
                // goes in as it is (podman and Docker detect the compression on load).
                let name = format!("{}.tar", digest_hex(&l.digest)?);
                if written.insert(name.clone()) {
                    let (mut r, size) = open_blob(img, &l.src)?;
                    sink.file(&name, size, &mut r)?;
                }
                name
            }
            Compression::Gzip => {
                let name = format!("{}.tar", digest_hex(diff_id)?);
                if written.insert(name.clone()) {
                    // Pass 1: the uncompressed size (a tar header needs it up front) and a
                    // check that it really is the layer the config names.
                    let (r, _) = open_blob(img, &l.src)?;
                    let mut h = super::Hasher::new();
                    std::io::copy(&mut flate2::read::MultiGzDecoder::new(r), &mut h)
                        .with_context(|| format!("decompressing layer {}", l.digest))?;
                    let size = h.len;
                    let actual = h.finish();
                    if actual != *diff_id {
                        bail!(
                            "layer {} decompresses to {actual}, the config says {diff_id}",
                            l.digest
                        );
                    }
                    // Pass 2: stream it in.
                    let (r, _) = open_blob(img, &l.src)?;
                    sink.file(&name, size, &mut flate2::read::MultiGzDecoder::new(r))?;
                }
                name
            }
        };
        files.push(name);
    }
    let cname = format!("{}.json", digest_hex(&img.config_digest())?);
    sink.bytes(&cname, &img.config)?;

    // Legacy metadata, computed as skopeo does: a layer id per chain id, a parent link, and the
    // image's config attributes on the top layer.
    let mut chain = String::new();
    let mut last_id = String::new();
    for (i, (diff_id, file)) in diff_ids.iter().zip(&files).enumerate() {
        chain = if i == 0 {
            diff_id.clone()
        } else {
            super::sha256_digest(format!("{chain} {diff_id}").as_bytes())
        };
        let id = digest_hex(&chain)?.to_string();
        if !written.insert(id.clone()) {
            last_id = id;
            continue;
        }
        let mut j = serde_json::Map::new();
        j.insert("id".into(), json!(id));
        if !last_id.is_empty() {
            j.insert("parent".into(), json!(last_id));
        }
        if i + 1 == diff_ids.len() {
            for k in [
                "architecture",
                "config",
                "container",
                "container_config",
                "created",
                "docker_version",
                "os",
            ] {
                if let Some(v) = cfg.get(k) {
                    j.insert(k.into(), v.clone());
                }
            }
        }
        sink.dir(&id)?;
        sink.bytes(&format!("{id}/VERSION"), b"1.0")?;
        sink.bytes(
            &format!("{id}/json"),
            &serde_json::to_vec(&Value::Object(j))?,
        )?;
        sink.symlink(&format!("{id}/layer.tar"), &format!("../{file}"))?;
        last_id = id;
    }

    let tags: Value = match &repo_tag {
        Some(t) => json!([t]),
        None => Value::Null,
    };
    let manifest = json!([{ "Config": cname, "RepoTags": tags, "Layers": files }]);
    sink.bytes("manifest.json", &serde_json::to_vec(&manifest)?)?;
    if let Some(t) = &repo_tag {
        let last = t.rsplit('/').next().unwrap_or(t);
        let split = t.len() - last.len() + last.rfind(':').expect("with_default_tag adds a tag");
        let (repo, tag) = (&t[..split], &t[split + 1..]);
        sink.bytes(
            "repositories",
            &serde_json::to_vec(&json!({ repo: { tag: last_id } }))?,
        )?;
    }
    Ok(())
}
