//! Reading an image from any supported transport into an [`Image`].

use super::store::Store;
use super::{
    BlobSrc, Compression, Flavor, Image, ImageRef, Layer, SourceManifest, Transport, digest_hex,
    media,
};
use anyhow::{Context as _, Result, bail};
use serde_json::Value;
use std::io::Read as _;

/// Reads the image `r` names. `want_arch`: the platform to pick from a multi-platform index
/// (the entrypoint binary's architecture).
pub fn read(r: &ImageRef, want_arch: Option<&str>) -> Result<Image> {
    let ctx = || format!("reading {r}");
    match r.transport {
        Transport::Oci => read_oci(
            Store::dir(&r.path).with_context(ctx)?,
            r.tag.as_deref(),
            want_arch,
        ),
        Transport::OciArchive => {
            let store = Store::tar(&r.path).with_context(ctx)?;
            let note = gunzip_note(&store);
            read_oci(store, r.tag.as_deref(), want_arch).map(|i| with_note(i, note))
        }
        Transport::DockerArchive => {
            let store = Store::tar(&r.path).with_context(ctx)?;
            let note = gunzip_note(&store);
            read_docker_archive(store, r.tag.as_deref()).map(|i| with_note(i, note))
        }
    }
    .with_context(ctx)
}

fn gunzip_note(store: &Store) -> Option<String> {
    store.gunzipped_from().map(|p| {
        format!(
            "{} is gzip-compressed; it was read through a decompressed copy, and the result is \
             written as a plain tar (`docker load`/`podman load` take either; gzip it again if you like)",
            p.display()
        )
    })
}

fn with_note(mut img: Image, note: Option<String>) -> Image {
    img.notes.extend(note);
    img
}

fn parse_json(bytes: &[u8], what: &str) -> Result<Value> {
    serde_json::from_slice(bytes).with_context(|| format!("{what} is not valid JSON"))
}

pub(super) fn blob_name(digest: &str) -> Result<String> {
    Ok(format!("blobs/sha256/{}", digest_hex(digest)?))
}

/// Reads a small blob and checks its digest.
fn read_blob(store: &Store, digest: &str, what: &str) -> Result<Vec<u8>> {
    let b = store
        .read_small(&blob_name(digest)?)
        .with_context(|| format!("reading the {what} {digest}"))?;
    let actual = super::sha256_digest(&b);
    if actual != digest {
        bail!("the {what} blob {digest} is corrupt (its content hashes to {actual})");
    }
    Ok(b)
}

fn ref_names(desc: &Value) -> Vec<String> {
    [media::REF_NAME, media::CONTAINERD_NAME]
        .iter()
        .filter_map(|k| desc["annotations"][*k].as_str().map(str::to_string))
        .collect()
}

fn is_index(mt: &str) -> bool {
    mt == media::OCI_INDEX || mt == media::DOCKER_LIST
}

fn read_oci(store: Store, tag: Option<&str>, want_arch: Option<&str>) -> Result<Image> {
    if !store.exists("oci-layout") {
        bail!(
            "{} is not an OCI image layout (no oci-layout file); for `docker save`/`podman save` \
             output use docker-archive:",
            store.describe()
        );
    }
    let index = parse_json(&store.read_small("index.json")?, "index.json")?;
    let manifests = index["manifests"]
        .as_array()
        .context("index.json has no manifests list")?;
    let chosen = match tag {
        Some(t) => manifests
            .iter()
            .find(|d| ref_names(d).iter().any(|n| n == t))
            .with_context(|| {
                let names: Vec<String> = manifests.iter().flat_map(ref_names).collect();
                format!("no image tagged {t:?} in index.json (tags: {names:?})")
            })?,
        None => match manifests.as_slice() {
            [one] => one,
            [] => bail!("index.json lists no images"),
            many => {
                let names: Vec<String> = many.iter().flat_map(ref_names).collect();
                bail!(
                    "index.json lists {} images; name one with :TAG (tags: {names:?})",
                    many.len()
                )
            }
        },
    };
    let name = tag.map(str::to_string).or_else(|| {
        chosen["annotations"][media::REF_NAME]
            .as_str()
            .map(str::to_string)
    });
    let mut notes = Vec::new();
    let mut desc = chosen.clone();
    // A multi-platform index (possibly nested once): pick the entrypoint's platform.
    for _ in 0..2 {
        let mt = desc["mediaType"].as_str().unwrap_or(media::OCI_MANIFEST);
        if !is_index(mt) {
            break;
        }
        let digest = desc["digest"]
            .as_str()
            .context("index entry without a digest")?;
        let sub = parse_json(
            &read_blob(&store, digest, "image index")?,
            "the image index",
        )?;
        let arch = want_arch.unwrap_or("amd64");
        let list = sub["manifests"]
            .as_array()
            .context("image index without manifests")?;
        let pick = list
            .iter()
            .find(|d| d["platform"]["os"] == "linux" && d["platform"]["architecture"] == arch)
            .with_context(|| {
                let platforms: Vec<String> = list
                    .iter()
                    .map(|d| {
                        format!(
                            "{}/{}",
                            d["platform"]["os"].as_str().unwrap_or("?"),
                            d["platform"]["architecture"].as_str().unwrap_or("?")
                        )
                    })
                    .collect();
                format!(
                    "the multi-platform image has no linux/{arch} variant (it has {platforms:?})"
                )
            })?;
        notes.push(format!(
            "multi-platform image: took its linux/{arch} variant (the output holds only that one)"
        ));
        desc = pick.clone();
    }
    let mdigest = desc["digest"]
        .as_str()
        .context("manifest descriptor without a digest")?;
    let mbytes = read_blob(&store, mdigest, "manifest")?;
    let m = parse_json(&mbytes, "the manifest")?;
    let mt = m["mediaType"]
        .as_str()
        .or_else(|| desc["mediaType"].as_str())
        .unwrap_or(media::OCI_MANIFEST)
        .to_string();
    let flavor = match mt.as_str() {
        media::OCI_MANIFEST => Flavor::Oci,
        media::DOCKER_MANIFEST => Flavor::Docker,
        other => bail!(
            "unsupported manifest type {other:?} (need an OCI or Docker schema 2 image manifest)"
        ),
    };
    let cdigest = m["config"]["digest"]
        .as_str()
        .context("manifest without a config")?;
    let config = read_blob(&store, cdigest, "config")?;
    let config_media_type = m["config"]["mediaType"]
        .as_str()
        .unwrap_or(match flavor {
            Flavor::Oci => media::OCI_CONFIG,
            Flavor::Docker => media::DOCKER_CONFIG,
        })
        .to_string();
    let mut layers = Vec::new();
    for d in m["layers"].as_array().context("manifest without layers")? {
        let digest = d["digest"]
            .as_str()
            .context("layer without a digest")?
            .to_string();
        let size = d["size"].as_u64().context("layer without a size")?;
        let lmt = d["mediaType"].as_str().unwrap_or("");
        if lmt.contains("nondistributable") || lmt.contains("foreign") {
            bail!("layer {digest} is a foreign/non-distributable layer ({lmt}); not supported");
        }
        let blob = blob_name(&digest)?;
        if !store.exists(&blob) {
            bail!("layer blob {digest} is missing from {}", store.describe());
        }
        layers.push(Layer {
            compression: Compression::from_media_type(lmt),
            descriptor: Some(d.clone()),
            src: BlobSrc::Store(blob),
            digest,
            size,
        });
    }
    Ok(Image {
        store,
        flavor,
        manifest: Some(SourceManifest {
            bytes: mbytes,
            value: m,
            media_type: mt,
        }),
        config,
        config_media_type,
        layers,
        name,
        changed: false,
        notes,
    })
}

/// `name` with `:latest` added when it has no tag (Docker's rule for RepoTags).
pub(super) fn with_default_tag(name: &str) -> String {
    let last = name.rsplit('/').next().unwrap_or(name);
    if last.contains(':') {
        name.to_string()
    } else {
        format!("{name}:latest")
    }
}

fn read_docker_archive(store: Store, tag: Option<&str>) -> Result<Image> {
    if !store.exists("manifest.json") {
        bail!(
            "{} is not a docker-archive (no manifest.json); for an OCI layout tarball use oci-archive:",
            store.describe()
        );
    }
    let list = parse_json(&store.read_small("manifest.json")?, "manifest.json")?;
    let items = list.as_array().context("manifest.json is not a list")?;
    let tags_of = |i: &Value| -> Vec<String> {
        i["RepoTags"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|t| t.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let (item, name) = match tag {
        Some(t) => {
            let want = with_default_tag(t);
            let item = items
                .iter()
                .find(|i| tags_of(i).iter().any(|x| *x == want || x == t))
                .with_context(|| {
                    let all: Vec<String> = items.iter().flat_map(tags_of).collect();
                    format!("no image tagged {t:?} in the archive (tags: {all:?})")
                })?;
            (item, Some(want))
        }
        None => match items.as_slice() {
            [one] => (one, tags_of(one).into_iter().next()),
            [] => bail!("manifest.json lists no images"),
            many => {
                let all: Vec<String> = many.iter().flat_map(tags_of).collect();
                bail!(
                    "the archive holds {} images; name one with :NAME:TAG (tags: {all:?})",
                    many.len()
                )
            }
        },
    };
    let config_path = item["Config"]
        .as_str()
        .context("manifest.json entry without Config")?;
    let config = store.read_small(config_path)?;
    let mut layers = Vec::new();
    for p in item["Layers"]
        .as_array()
        .context("manifest.json entry without Layers")?
    {
        let p = p.as_str().context("a Layers entry is not a string")?;
        // docker-archive records no digests: hash each layer file (and sniff its compression).
        let (mut r, size) = store.open(p)?;
        let mut head = [0u8; 4];
        let mut got = 0;
        while got < head.len() {
            let n = r.read(&mut head[got..])?;
            if n == 0 {
                break;
            }
            got += n;
        }
        let mut h = super::Hasher::new();
        std::io::Write::write_all(&mut h, &head[..got])?;
        std::io::copy(&mut r, &mut h)?;
        if h.len != size {
            bail!("layer file {p} is truncated");
        }
        layers.push(Layer {
            digest: h.finish(),
            size,
            compression: Compression::sniff(&head[..got]),
            descriptor: None,
            src: BlobSrc::Store(p.to_string()),
        });
    }
    Ok(Image {
        store,
        // A layout written from it uses OCI media types (as skopeo does).
        flavor: Flavor::Oci,
        manifest: None,
        config,
        config_media_type: media::OCI_CONFIG.to_string(),
        layers,
        name,
        // No manifest to copy: whatever we write is built fresh.
        changed: true,
        notes: Vec::new(),
    })
}
