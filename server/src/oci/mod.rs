//! Container images without a daemon, for `waypost inject`: read an image from an OCI layout
//! directory, an `oci-archive` or a `docker-archive` tarball (skopeo's transport syntax), add
//! one layer holding the static entrypoint, and write the result in the destination's format.
//!
//! Model: an [`Image`] is its config (kept as the source's bytes until something changes, so
//! an unchanged image is copied byte for byte) plus its layer blobs, which stay where they
//! are in the source ([`store::Store`]) or, for the layer we add, in memory. [`read`] turns any
//! transport into that model and [`write`] turns it back into any transport.
//!
//! Formats handled: OCI image manifests/configs and Docker v2 schema 2 manifests/configs (the
//! same config JSON; only media types differ), single images or a multi-platform index (the
//! platform matching the entrypoint binary is picked), docker-archive from `docker save`
//! (legacy `<id>/layer.tar` layout or the newer `blobs/sha256/...` one) and `podman save`.

pub mod elf;
pub mod layer;
mod read;
mod store;
mod write;

pub use read::read;
pub use write::{check_destination, write};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

/// Where the entrypoint lives inside the image.
pub const ENTRYPOINT_PATH: &str = "/waypost-entrypoint";
/// `comment` of the history entry we add: with Entrypoint[0] == [`ENTRYPOINT_PATH`] it marks an
/// image as injected.
pub const MARKER: &str = "waypost-inject";

/// Secrets that must never be baked into an image (anyone who can pull it can read them).
pub const FORBIDDEN_ENV: &[&str] = &[
    "WAYPOST_TOKEN",
    "WAYPOINT_CEB_INVITE_TOKEN",
    "WAYPOST_ADMIN_TOKEN",
];

pub mod media {
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
    pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
    pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
    pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar";
    pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
    /// Annotation naming an image in an OCI layout's index (skopeo's `oci:DIR:TAG`).
    pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
    /// The full image name containerd/Docker 25+ put next to it.
    pub const CONTAINERD_NAME: &str = "io.containerd.image.name";
}

// ---- digests ---------------------------------------------------------------------------------

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!(
        "sha256:{}",
        hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
    )
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A streaming sha256 that also counts bytes (an `io::Write` sink).
pub struct Hasher {
    ctx: ring::digest::Context,
    pub len: u64,
}

impl Hasher {
    pub fn new() -> Hasher {
        Hasher {
            ctx: ring::digest::Context::new(&ring::digest::SHA256),
            len: 0,
        }
    }
    pub fn finish(self) -> String {
        format!("sha256:{}", hex(self.ctx.finish().as_ref()))
    }
}

impl Default for Hasher {
    fn default() -> Self {
        Hasher::new()
    }
}

impl std::io::Write for Hasher {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.ctx.update(b);
        self.len += b.len() as u64;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The hex part of a `sha256:` digest, checked (it becomes a file name: no `/`, no `..`).
pub fn digest_hex(d: &str) -> Result<&str> {
    match d.split_once(':') {
        Some(("sha256", h))
            if h.len() == 64
                && h.bytes()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()) =>
        {
            Ok(h)
        }
        Some((alg, _)) if alg != "sha256" => {
            bail!("unsupported digest algorithm in {d:?} (only sha256)")
        }
        _ => bail!("malformed digest {d:?}"),
    }
}

// ---- references ------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// `oci:DIR[:TAG]` — an OCI image layout directory.
    Oci,
    /// `oci-archive:FILE[:TAG]` — a tarball of an OCI image layout.
    OciArchive,
    /// `docker-archive:FILE[:NAME:TAG]` — what `docker save` / `podman save` write.
    DockerArchive,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Oci => "oci",
            Transport::OciArchive => "oci-archive",
            Transport::DockerArchive => "docker-archive",
        }
    }
}

/// An image location in skopeo's transport syntax.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    pub transport: Transport,
    pub path: PathBuf,
    /// `oci`/`oci-archive`: the ref name in index.json; `docker-archive`: a `name:tag` in
    /// RepoTags.
    pub tag: Option<String>,
}

impl ImageRef {
    /// Parses `TRANSPORT:PATH[:TAG]`. As in skopeo, the path ends at the first `:` after the
    /// transport (so a docker-archive reference may itself contain `:`).
    pub fn parse(s: &str) -> Result<ImageRef> {
        let (t, rest) = s.split_once(':').with_context(|| {
            format!(
                "{s:?}: expected TRANSPORT:PATH, e.g. oci:DIR[:TAG], oci-archive:FILE[:TAG] or \
                 docker-archive:FILE[:NAME:TAG]"
            )
        })?;
        let transport = match t {
            "oci" => Transport::Oci,
            "oci-archive" => Transport::OciArchive,
            "docker-archive" => Transport::DockerArchive,
            "docker" | "docker-daemon" | "containers-storage" | "dir" => bail!(
                "{s:?}: transport {t:?} needs a registry or daemon; `waypost inject` works on files: \
                 copy the image out first, e.g. `skopeo copy {s} oci-archive:image.tar` or \
                 `podman save -o image.tar IMAGE`"
            ),
            _ => bail!(
                "{s:?}: unknown transport {t:?}; use oci:DIR[:TAG], oci-archive:FILE[:TAG] or \
                 docker-archive:FILE[:NAME:TAG]"
            ),
        };
        let (path, tag) = match rest.split_once(':') {
            Some((p, tag)) => (p, Some(tag.to_string()).filter(|t| !t.is_empty())),
            None => (rest, None),
        };
        if path.is_empty() {
            bail!("{s:?}: empty path");
        }
        Ok(ImageRef {
            transport,
            path: PathBuf::from(path),
            tag,
        })
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.transport.name(), self.path.display())?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        Ok(())
    }
}

// ---- the image model -------------------------------------------------------------------------

/// Which family of media types a manifest uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    Oci,
    Docker,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    pub fn sniff(head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    fn from_media_type(mt: &str) -> Compression {
        if mt.ends_with("gzip") {
            Compression::Gzip
        } else if mt.ends_with("zstd") {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    pub fn media_type(self, flavor: Flavor) -> &'static str {
        match (flavor, self) {
            (Flavor::Oci, Compression::None) => media::OCI_LAYER,
            (Flavor::Oci, Compression::Gzip) => media::OCI_LAYER_GZIP,
            (Flavor::Oci | Flavor::Docker, Compression::Zstd) => media::OCI_LAYER_ZSTD,
            (Flavor::Docker, Compression::None) => media::DOCKER_LAYER,
            (Flavor::Docker, Compression::Gzip) => media::DOCKER_LAYER_GZIP,
        }
    }
}

#[derive(Clone)]
pub(crate) enum BlobSrc {
    /// A file in the source store.
    Store(String),
    Memory(Arc<[u8]>),
}

/// One layer blob.
#[derive(Clone)]
pub struct Layer {
    /// Digest of the blob as stored (compressed if it is).
    pub digest: String,
    pub size: u64,
    pub compression: Compression,
    /// The source manifest's descriptor for it (media type, annotations, urls), if any.
    pub descriptor: Option<Value>,
    pub(crate) src: BlobSrc,
}

/// The source's manifest, kept so an unchanged image keeps its exact bytes.
pub struct SourceManifest {
    pub bytes: Vec<u8>,
    pub value: Value,
    pub media_type: String,
}

pub struct Image {
    pub(crate) store: store::Store,
    pub flavor: Flavor,
    pub manifest: Option<SourceManifest>,
    /// The config blob's bytes.
    pub config: Vec<u8>,
    pub config_media_type: String,
    pub layers: Vec<Layer>,
    /// The source's name for the image (ref name or repo tag), carried over when DST has none.
    pub name: Option<String>,
    /// Set when config or layers no longer match the source manifest.
    pub changed: bool,
    /// Notes for the user (e.g. a platform picked from an index).
    pub notes: Vec<String>,
}

impl fmt::Debug for Image {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Image")
            .field("flavor", &self.flavor)
            .field("config", &self.config_digest())
            .field(
                "layers",
                &self.layers.iter().map(|l| &l.digest).collect::<Vec<_>>(),
            )
            .field("name", &self.name)
            .finish()
    }
}

impl Image {
    pub fn config_digest(&self) -> String {
        sha256_digest(&self.config)
    }

    pub fn config_json(&self) -> Result<Value> {
        serde_json::from_slice(&self.config).context("the image config is not valid JSON")
    }

    /// The image's Entrypoint and Cmd (empty when absent or null).
    pub fn entrypoint_and_cmd(&self) -> Result<(Vec<String>, Vec<String>)> {
        let cfg = self.config_json()?;
        Ok((
            string_list(&cfg["config"]["Entrypoint"], "Entrypoint")?,
            string_list(&cfg["config"]["Cmd"], "Cmd")?,
        ))
    }

    /// An image built in memory (tests, and base images for the container tests): `layers` are
    /// uncompressed tars, gzip'd when `gzip`; config is the config JSON without `rootfs`
    /// (filled in here).
    pub fn from_parts(
        mut config: Value,
        layers: &[Vec<u8>],
        gzip: bool,
        flavor: Flavor,
    ) -> Result<Image> {
        let mut out = Vec::new();
        let mut diff_ids = Vec::new();
        for l in layers {
            diff_ids.push(Value::String(sha256_digest(l)));
            let blob: Arc<[u8]> = if gzip {
                layer::gzip(l)?.into()
            } else {
                l.clone().into()
            };
            out.push(Layer {
                digest: sha256_digest(&blob),
                size: blob.len() as u64,
                compression: if gzip {
                    Compression::Gzip
                } else {
                    Compression::None
                },
                descriptor: None,
                src: BlobSrc::Memory(blob),
            });
        }
        config["rootfs"] = json!({ "type": "layers", "diff_ids": diff_ids });
        Ok(Image {
            store: store::Store::Nothing,
            flavor,
            manifest: None,
            config: serde_json::to_vec(&config)?,
            config_media_type: match flavor {
                Flavor::Oci => media::OCI_CONFIG,
                Flavor::Docker => media::DOCKER_CONFIG,
            }
            .to_string(),
            layers: out,
            name: None,
            changed: true,
            notes: Vec::new(),
        })
    }
}

/// A JSON array of strings, or null/absent as empty.
fn string_list(v: &Value, what: &str) -> Result<Vec<String>> {
    match v {
        Value::Null => Ok(Vec::new()),
        Value::Array(a) => a
            .iter()
            .map(|s| {
                s.as_str()
                    .map(str::to_string)
                    .with_context(|| format!("config {what} holds a non-string"))
            })
            .collect(),
        _ => bail!("config {what} is not a list of strings"),
    }
}

// ---- injection -------------------------------------------------------------------------------

/// Checks one `--env KEY=VALUE`; returns (KEY, VALUE).
pub fn parse_env(kv: &str) -> Result<(String, String)> {
    let (k, v) = kv
        .split_once('=')
        .with_context(|| format!("--env {kv:?}: expected KEY=VALUE"))?;
    if k.is_empty() || k.contains('\0') || v.contains('\0') {
        bail!("--env {kv:?}: expected KEY=VALUE with a non-empty KEY");
    }
    if FORBIDDEN_ENV.contains(&k) {
        bail!(
            "refusing to bake {k} into the image: it is a secret, and anyone who can pull the image \
             can read its config; pass it when the container starts instead (podman/docker run -e {k}=... \
             or --env-file, a Kubernetes Secret)"
        );
    }
    Ok((k.to_string(), v.to_string()))
}

pub struct InjectOptions<'a> {
    /// The static entrypoint binary's bytes.
    pub binary: &'a [u8],
    /// Settings to bake into the config's Env (already checked with [`parse_env`]).
    pub env: &'a [(String, String)],
}

#[derive(Debug)]
pub enum Outcome {
    Injected {
        layer_digest: String,
        diff_id: String,
        /// The layer's blob size (gzip'd) and its uncompressed tar size.
        compressed: u64,
        uncompressed: u64,
        entrypoint: Vec<String>,
        cmd: Vec<String>,
        env_changed: bool,
    },
    /// Entrypoint[0] is already the entrypoint: no layer added, Entrypoint untouched.
    AlreadyInjected {
        /// The history marker is there (ours); false: a hand-built image (COPY + ENTRYPOINT).
        by_waypost: bool,
        /// `--env` changed the config (the only change made).
        env_changed: bool,
    },
}

/// Sets `KEY=VALUE` in the config's Env, replacing an existing KEY in place. Returns whether
/// anything changed.
fn bake_env(c: &mut serde_json::Map<String, Value>, env: &[(String, String)]) -> Result<bool> {
    if env.is_empty() {
        return Ok(false);
    }
    let mut list = string_list(c.get("Env").unwrap_or(&Value::Null), "Env")?;
    let before = list.clone();
    for (k, v) in env {
        let entry = format!("{k}={v}");
        match list
            .iter_mut()
            .find(|e| e.split_once('=').map_or(e.as_str(), |(ek, _)| ek) == k)
        {
            Some(e) => *e = entry,
            None => list.push(entry),
        }
    }
    if list == before {
        return Ok(false);
    }
    c.insert("Env".into(), json!(list));
    Ok(true)
}

/// Adds the entrypoint layer to `img` and prefixes its Entrypoint, unless it is already there.
pub fn inject(img: &mut Image, opts: &InjectOptions) -> Result<Outcome> {
    for (k, _) in opts.env {
        // Library callers get the same guarantee as the CLI.
        parse_env(&format!("{k}=x"))?;
    }
    let elf = elf::check_static(opts.binary)
        .map_err(|e| anyhow::anyhow!("the entrypoint binary is unusable: {e}"))?;
    let mut cfg = img.config_json()?;
    let Some(root) = cfg.as_object_mut() else {
        bail!("the image config is not a JSON object");
    };
    if let (Some(want), Some(have)) = (root.get("architecture").and_then(Value::as_str), elf.arch) {
        if want != have {
            bail!(
                "the image is for {want} but the entrypoint binary is for {have}; build the \
                 entrypoint for {want}"
            );
        }
    }
    if let Some(os) = root.get("os").and_then(Value::as_str) {
        if os != "linux" {
            bail!("the image is for {os}; the entrypoint runs on linux only");
        }
    }
    let created = root.get("created").cloned();
    let marked = root
        .get("history")
        .and_then(Value::as_array)
        // The marker of the layer we add (an --env-only entry, empty_layer, does not count).
        .is_some_and(|h| {
            h.iter()
                .any(|e| e["comment"] == MARKER && e["empty_layer"] != true)
        });
    let c = root.entry("config").or_insert_with(|| json!({}));
    if c.is_null() {
        *c = json!({});
    }
    let c = c
        .as_object_mut()
        .context("config.config is not an object")?;
    let entrypoint = string_list(c.get("Entrypoint").unwrap_or(&Value::Null), "Entrypoint")?;
    let cmd = string_list(c.get("Cmd").unwrap_or(&Value::Null), "Cmd")?;
    let env_changed = bake_env(c, opts.env)?;
    let env_text = opts
        .env
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ");

    if entrypoint.first().map(String::as_str) == Some(ENTRYPOINT_PATH) {
        if env_changed {
            push_history(
                root,
                created,
                format!("waypost inject: ENV {env_text}"),
                true,
            );
            img.config = serde_json::to_vec(&cfg)?;
            img.changed = true;
        }
        return Ok(Outcome::AlreadyInjected {
            by_waypost: marked,
            env_changed,
        });
    }

    let built = layer::entrypoint_layer(opts.binary)?;
    let mut new_ep = vec![ENTRYPOINT_PATH.to_string()];
    new_ep.extend(entrypoint.iter().cloned());
    c.insert("Entrypoint".into(), json!(new_ep));
    let rootfs = root
        .entry("rootfs")
        .or_insert_with(|| json!({ "type": "layers", "diff_ids": [] }));
    let diff_ids = rootfs
        .get_mut("diff_ids")
        .and_then(Value::as_array_mut)
        .context("the image config has no rootfs.diff_ids list")?;
    if diff_ids.len() != img.layers.len() {
        bail!(
            "the image config lists {} layers (rootfs.diff_ids) but the manifest {}; the image is inconsistent",
            diff_ids.len(),
            img.layers.len()
        );
    }
    diff_ids.push(Value::String(built.diff_id.clone()));
    let mut created_by = format!(
        "waypost inject: COPY waypost-entrypoint {ENTRYPOINT_PATH}; ENTRYPOINT {}",
        serde_json::to_string(&new_ep)?
    );
    if !env_text.is_empty() {
        created_by.push_str(&format!("; ENV {env_text}"));
    }
    push_history(root, created, created_by, false);
    img.config = serde_json::to_vec(&cfg)?;
    let gz: Arc<[u8]> = built.gz.into();
    img.layers.push(Layer {
        digest: built.digest.clone(),
        size: gz.len() as u64,
        compression: Compression::Gzip,
        descriptor: None,
        src: BlobSrc::Memory(gz.clone()),
    });
    img.changed = true;
    Ok(Outcome::Injected {
        layer_digest: built.digest,
        diff_id: built.diff_id,
        compressed: gz.len() as u64,
        uncompressed: built.tar.len() as u64,
        entrypoint: new_ep,
        cmd,
        env_changed,
    })
}

/// Appends a history entry. Its `created` is the image's own, so the output is reproducible
/// (the same inputs always give the same digests).
fn push_history(
    root: &mut serde_json::Map<String, Value>,
    created: Option<Value>,
    created_by: String,
    empty_layer: bool,
) {
    let mut h = serde_json::Map::new();
    if let Some(c) = created.filter(Value::is_string) {
        h.insert("created".into(), c);
    }
    h.insert("created_by".into(), Value::String(created_by));
    h.insert("comment".into(), Value::String(MARKER.into()));
    if empty_layer {
        h.insert("empty_layer".into(), Value::Bool(true));
    }
    let hist = root.entry("history").or_insert_with(|| json!([]));
    if !hist.is_array() {
        *hist = json!([]);
    }
    hist.as_array_mut()
        .expect("just made an array")
        .push(Value::Object(h));
}

#[cfg(test)]
mod tests;
