//! Unit tests for image manipulation, on tiny synthetic images built here.

use super::*;
use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::Path;

/// A minimal ELF64 LE x86-64 header with the given program header types (1 = PT_LOAD,
/// 3 = PT_INTERP), padded with a payload so layers have some content.
pub fn fake_elf(phdrs: &[u32]) -> Vec<u8> {
    let mut b = vec![0u8; 64 + 56 * phdrs.len()];
    b[..4].copy_from_slice(b"\x7fELF");
    b[4] = 2;
    b[5] = 1;
    b[6] = 1;
    b[16..18].copy_from_slice(&2u16.to_le_bytes());
    b[18..20].copy_from_slice(&62u16.to_le_bytes());
    b[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
    b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
    b[0x38..0x3a].copy_from_slice(&(phdrs.len() as u16).to_le_bytes());
    for (i, t) in phdrs.iter().enumerate() {
        let o = 64 + 56 * i;
        b[o..o + 4].copy_from_slice(&t.to_le_bytes());
    }
    b
}

fn static_bin() -> Vec<u8> {
    let mut b = fake_elf(&[1]);
    b.extend(b"pretend machine code ".repeat(200));
    b
}

fn base_config(entrypoint: Value, cmd: Value) -> Value {
    json!({
        "created": "2024-01-02T03:04:05Z",
        "architecture": "amd64",
        "os": "linux",
        "config": { "Env": ["PATH=/bin", "WAYPOST_LOG_LEVEL=DEBUG"], "Entrypoint": entrypoint, "Cmd": cmd },
        "history": [{ "created": "2024-01-02T03:04:05Z", "created_by": "base layer" }],
    })
}

fn base_layer() -> Vec<u8> {
    layer::single_file_tar("bin/app", 0o755, b"#!/bin/sh\necho app\n").unwrap()
}

/// A synthetic one-layer image written to `dst`.
fn make_image(dst: &ImageRef, entrypoint: Value, cmd: Value, flavor: Flavor) {
    let img =
        Image::from_parts(base_config(entrypoint, cmd), &[base_layer()], true, flavor).unwrap();
    write(&img, dst).unwrap();
}

fn r(s: &str) -> ImageRef {
    ImageRef::parse(s).unwrap()
}

fn at(dir: &Path, transport: &str, file: &str) -> ImageRef {
    r(&format!("{transport}:{}", dir.join(file).display()))
}

fn opts<'a>(bin: &'a [u8], env: &'a [(String, String)]) -> InjectOptions<'a> {
    InjectOptions { binary: bin, env }
}

/// Reads an image, checks every digest and size a consumer would check, and returns it.
fn read_checked(src: &ImageRef) -> Image {
    let img = read(src, None).unwrap();
    let cfg = img.config_json().unwrap();
    let diff_ids = cfg["rootfs"]["diff_ids"].as_array().unwrap();
    assert_eq!(diff_ids.len(), img.layers.len(), "one diff_id per layer");
    for (l, d) in img.layers.iter().zip(diff_ids) {
        let (mut rd, size) = write::open_blob_for_test(&img, l);
        let mut blob = Vec::new();
        rd.read_to_end(&mut blob).unwrap();
        assert_eq!(size, l.size);
        assert_eq!(blob.len() as u64, l.size, "layer size");
        assert_eq!(
            sha256_digest(&blob),
            l.digest,
            "layer digest = sha256 of the blob"
        );
        let tar = match Compression::sniff(&blob) {
            Compression::Gzip => {
                let mut t = Vec::new();
                flate2::read::MultiGzDecoder::new(&blob[..])
                    .read_to_end(&mut t)
                    .unwrap();
                t
            }
            _ => blob,
        };
        assert_eq!(
            sha256_digest(&tar),
            d.as_str().unwrap(),
            "diff_id = sha256 of the uncompressed tar"
        );
    }
    if let Some(m) = &img.manifest {
        assert_eq!(m.value["config"]["digest"], img.config_digest());
        assert_eq!(m.value["config"]["size"], img.config.len());
    }
    img
}

fn file_hashes(p: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if p.is_file() {
        out.insert(String::new(), sha256_digest(&std::fs::read(p).unwrap()));
        return out;
    }
    for e in std::fs::read_dir(p).unwrap() {
        let e = e.unwrap();
        for (k, v) in file_hashes(&e.path()) {
            out.insert(format!("{}/{k}", e.file_name().to_string_lossy()), v);
        }
    }
    out
}

fn inject_cli(src: &ImageRef, dst: &ImageRef, bin: &[u8], env: &[(String, String)]) -> Outcome {
    check_destination(src, dst).unwrap();
    let mut img = read(src, Some("amd64")).unwrap();
    let out = inject(&mut img, &opts(bin, env)).unwrap();
    write(&img, dst).unwrap();
    out
}

#[test]
fn refs_parse_like_skopeo() {
    assert_eq!(
        r("oci:/tmp/x:v1"),
        ImageRef {
            transport: Transport::Oci,
            path: "/tmp/x".into(),
            tag: Some("v1".into())
        }
    );
    assert_eq!(r("oci-archive:img.tar").tag, None);
    let d = r("docker-archive:/a/b.tar:localhost/app:1.2");
    assert_eq!(d.transport, Transport::DockerArchive);
    assert_eq!(d.path, Path::new("/a/b.tar"));
    assert_eq!(d.tag.as_deref(), Some("localhost/app:1.2"));
    assert_eq!(d.to_string(), "docker-archive:/a/b.tar:localhost/app:1.2");
    assert!(ImageRef::parse("image.tar").is_err());
    assert!(ImageRef::parse("oci:").is_err());
    let e = ImageRef::parse("docker://alpine").unwrap_err().to_string();
    assert!(e.contains("skopeo copy"), "{e}");
}

#[test]
fn digests_are_checked_before_they_become_paths() {
    assert!(digest_hex(&sha256_digest(b"x")).is_ok());
    assert!(digest_hex("sha256:../../etc/passwd").is_err());
    assert!(digest_hex("sha512:abcd").is_err());
    assert!(digest_hex(&format!("sha256:{}", "A".repeat(64))).is_err());
}

#[test]
fn inject_oci_layout_adds_one_layer_and_prefixes_entrypoint() {
    let t = tempfile::tempdir().unwrap();
    let src = at(t.path(), "oci", "base");
    make_image(
        &src,
        json!(["/bin/app", "--serve"]),
        json!(["--port", "80"]),
        Flavor::Oci,
    );
    let before = file_hashes(&src.path);
    let dst = at(t.path(), "oci", "out");
    let bin = static_bin();
    let out = inject_cli(&src, &dst, &bin, &[]);
    let Outcome::Injected {
        compressed,
        uncompressed,
        entrypoint,
        cmd,
        layer_digest,
        diff_id,
        ..
    } = out
    else {
        panic!("expected Injected, got {out:?}");
    };
    assert_eq!(entrypoint, ["/waypost-entrypoint", "/bin/app", "--serve"]);
    assert_eq!(cmd, ["--port", "80"]);
    assert_eq!(file_hashes(&src.path), before, "the source is untouched");

    let img = read_checked(&dst);
    assert_eq!(img.layers.len(), 2);
    let (ep, cmd) = img.entrypoint_and_cmd().unwrap();
    assert_eq!(ep, ["/waypost-entrypoint", "/bin/app", "--serve"]);
    assert_eq!(cmd, ["--port", "80"], "CMD untouched");
    let top = &img.layers[1];
    assert_eq!(top.digest, layer_digest);
    assert_eq!(top.size, compressed);
    assert_eq!(
        top.descriptor.as_ref().unwrap()["mediaType"],
        media::OCI_LAYER_GZIP
    );
    let m = &img.manifest.as_ref().unwrap();
    assert_eq!(m.media_type, media::OCI_MANIFEST);
    let cfg = img.config_json().unwrap();
    assert_eq!(cfg["rootfs"]["diff_ids"][1], diff_id.as_str());
    let hist = cfg["history"].as_array().unwrap();
    assert_eq!(hist.len(), 2);
    assert_eq!(hist[1]["comment"], MARKER);
    assert_eq!(
        hist[1]["created"], "2024-01-02T03:04:05Z",
        "reproducible: the image's own time"
    );
    assert!(uncompressed > bin.len() as u64 && compressed < uncompressed);

    // The new layer holds exactly the binary at /waypost-entrypoint, 0755 root.
    let BlobSrc::Store(name) = &top.src else {
        panic!()
    };
    let (rd, _) = img.store.open(name).unwrap();
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(rd));
    let mut e = ar.entries().unwrap().next().unwrap().unwrap();
    assert_eq!(e.path().unwrap().to_str(), Some("waypost-entrypoint"));
    assert_eq!(e.header().mode().unwrap(), 0o755);
    let mut content = Vec::new();
    e.read_to_end(&mut content).unwrap();
    assert_eq!(content, bin);

    // index.json points at the manifest.
    let index: Value =
        serde_json::from_slice(&std::fs::read(dst.path.join("index.json")).unwrap()).unwrap();
    let d = &index["manifests"][0];
    let mbytes = std::fs::read(
        dst.path
            .join(read::blob_name(d["digest"].as_str().unwrap()).unwrap()),
    )
    .unwrap();
    assert_eq!(d["size"], mbytes.len());
    assert_eq!(sha256_digest(&mbytes), d["digest"].as_str().unwrap());
}

#[test]
fn injecting_twice_changes_nothing() {
    let t = tempfile::tempdir().unwrap();
    let src = at(t.path(), "oci", "base");
    make_image(&src, json!(["/bin/app"]), Value::Null, Flavor::Oci);
    let once = at(t.path(), "oci", "once");
    let twice = at(t.path(), "oci", "twice");
    let bin = static_bin();
    assert!(matches!(
        inject_cli(&src, &once, &bin, &[]),
        Outcome::Injected { .. }
    ));
    let out = inject_cli(&once, &twice, &bin, &[]);
    assert!(
        matches!(
            out,
            Outcome::AlreadyInjected {
                by_waypost: true,
                env_changed: false
            }
        ),
        "{out:?}"
    );
    assert_eq!(
        file_hashes(&once.path),
        file_hashes(&twice.path),
        "an exact copy"
    );
    let img = read_checked(&twice);
    assert_eq!(img.layers.len(), 2);
    assert_eq!(
        img.entrypoint_and_cmd().unwrap().0,
        ["/waypost-entrypoint", "/bin/app"]
    );

    // Also through archives (the copy is rebuilt there, but with the same digests).
    let a1 = at(t.path(), "oci-archive", "a1.tar");
    let a2 = at(t.path(), "oci-archive", "a2.tar");
    inject_cli(&src, &a1, &bin, &[]);
    assert!(matches!(
        inject_cli(&a1, &a2, &bin, &[]),
        Outcome::AlreadyInjected { .. }
    ));
    assert_eq!(
        std::fs::read(&a1.path).unwrap(),
        std::fs::read(&a2.path).unwrap()
    );
}

#[test]
fn injection_is_reproducible() {
    let t = tempfile::tempdir().unwrap();
    let src = at(t.path(), "oci", "base");
    make_image(&src, json!(["/bin/app"]), Value::Null, Flavor::Oci);
    let bin = static_bin();
    for transport in ["oci-archive", "docker-archive"] {
        let a = at(t.path(), transport, "r1.tar");
        let b = at(t.path(), transport, "r2.tar");
        inject_cli(&src, &a, &bin, &[]);
        inject_cli(&src, &b, &bin, &[]);
        assert_eq!(
            std::fs::read(&a.path).unwrap(),
            std::fs::read(&b.path).unwrap(),
            "{transport}"
        );
    }
}

#[test]
fn image_without_entrypoint_gets_ours_and_keeps_cmd() {
    let t = tempfile::tempdir().unwrap();
    let src = at(t.path(), "oci-archive", "base.tar");
    make_image(&src, Value::Null, json!(["/bin/app", "x"]), Flavor::Oci);
    let dst = at(t.path(), "oci-archive", "out.tar");
    inject_cli(&src, &dst, &static_bin(), &[]);
    let (ep, cmd) = read_checked(&dst).entrypoint_and_cmd().unwrap();
    assert_eq!(ep, ["/waypost-entrypoint"]);
    assert_eq!(cmd, ["/bin/app", "x"]);
}

#[test]
fn env_is_baked_and_replaces_existing_keys() {
    let t = tempfile::tempdir().unwrap();
    let src = at(t.path(), "oci", "base");
    make_image(&src, json!(["/bin/app"]), Value::Null, Flavor::Oci);
    let dst = at(t.path(), "oci", "out");
    let env = vec![
        parse_env("WAYPOST_SERVER=ctl.example:9701").unwrap(),
        parse_env("WAYPOST_LOG_LEVEL=info").unwrap(),
        parse_env("EMPTY=").unwrap(),
    ];
    inject_cli(&src, &dst, &static_bin(), &env);
    let cfg = read_checked(&dst).config_json().unwrap();
    assert_eq!(
        cfg["config"]["Env"],
        json!([
            "PATH=/bin",
            "WAYPOST_LOG_LEVEL=info",
            "WAYPOST_SERVER=ctl.example:9701",
            "EMPTY="
        ])
    );
    // On an injected image, --env alone changes only the config (no second layer).
    let again = at(t.path(), "oci", "again");
    let out = inject_cli(
        &dst,
        &again,
        &static_bin(),
        &[parse_env("WAYPOST_LOG_LEVEL=warn").unwrap()],
    );
    assert!(
        matches!(
            out,
            Outcome::AlreadyInjected {
                env_changed: true,
                ..
            }
        ),
        "{out:?}"
    );
    let img = read_checked(&again);
    assert_eq!(img.layers.len(), 2);
    let cfg = img.config_json().unwrap();
    assert_eq!(cfg["config"]["Env"][1], "WAYPOST_LOG_LEVEL=warn");
    assert_eq!(
        cfg["history"].as_array().unwrap().last().unwrap()["empty_layer"],
        true
    );
}

#[test]
fn tokens_are_never_baked() {
    for k in ["WAYPOST_TOKEN", "WAYPOINT_CEB_INVITE_TOKEN"] {
        let e = parse_env(&format!("{k}=wpe_secret"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("refusing") && e.contains("when the container starts"),
            "{e}"
        );
        assert!(
            !e.contains("wpe_secret"),
            "the error must not echo the secret: {e}"
        );
    }
    assert!(parse_env("NOEQUALS").is_err());
    assert!(parse_env("=x").is_err());
    // The library refuses too, whatever the caller checked.
    let cfg = base_config(json!(["/bin/app"]), Value::Null);
    let mut img = Image::from_parts(cfg, &[base_layer()], true, Flavor::Oci).unwrap();
    let env = [("WAYPOST_TOKEN".to_string(), "x".to_string())];
    assert!(inject(&mut img, &opts(&static_bin(), &env)).is_err());
}

#[test]
fn bad_binaries_and_architectures_are_refused() {
    let mut img = Image::from_parts(
        base_config(json!(["/bin/app"]), Value::Null),
        &[base_layer()],
        true,
        Flavor::Oci,
    )
    .unwrap();
    let e = inject(&mut img, &opts(&fake_elf(&[3, 1]), &[]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("dynamically linked"), "{e}");
    let e = inject(&mut img, &opts(b"#!/bin/sh\n", &[]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not an ELF"), "{e}");
    let mut cfg = base_config(json!(["/bin/app"]), Value::Null);
    cfg["architecture"] = json!("arm64");
    let mut img = Image::from_parts(cfg, &[base_layer()], true, Flavor::Oci).unwrap();
    let e = inject(&mut img, &opts(&static_bin(), &[]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("arm64") && e.contains("amd64"), "{e}");
}

#[test]
fn docker_archive_round_trip() {
    let t = tempfile::tempdir().unwrap();
    let src = at(t.path(), "docker-archive", "base.tar:localhost/app:1");
    make_image(&src, json!(["/bin/app"]), json!(["serve"]), Flavor::Oci);
    // What we wrote is a docker-archive a loader understands: manifest.json, repositories.
    let base = read_checked(&src);
    assert_eq!(base.name.as_deref(), Some("localhost/app:1"));
    assert_eq!(
        base.layers[0].compression,
        Compression::None,
        "docker-archive layers are plain tar"
    );

    let dst = at(t.path(), "docker-archive", "out.tar");
    inject_cli(
        &r(&format!("docker-archive:{}", src.path.display())),
        &dst,
        &static_bin(),
        &[],
    );
    let img = read_checked(&dst);
    assert_eq!(
        img.name.as_deref(),
        Some("localhost/app:1"),
        "the name is carried over"
    );
    assert_eq!(img.layers.len(), 2);
    assert!(
        img.layers
            .iter()
            .all(|l| l.compression == Compression::None)
    );
    assert_eq!(
        img.entrypoint_and_cmd().unwrap(),
        (
            vec!["/waypost-entrypoint".into(), "/bin/app".into()],
            vec!["serve".into()]
        )
    );
    let store = store::Store::tar(&dst.path).unwrap();
    let manifest: Value =
        serde_json::from_slice(&store.read_small("manifest.json").unwrap()).unwrap();
    assert_eq!(manifest[0]["RepoTags"], json!(["localhost/app:1"]));
    let repos: Value = serde_json::from_slice(&store.read_small("repositories").unwrap()).unwrap();
    let top = repos["localhost/app"]["1"].as_str().unwrap();
    assert!(
        store.exists(&format!("{top}/layer.tar")),
        "legacy layer dirs resolve"
    );
    let cfg = img.config_json().unwrap();
    let layer_file = manifest[0]["Layers"][1].as_str().unwrap();
    assert_eq!(
        format!("sha256:{layer_file}").replace(".tar", ""),
        cfg["rootfs"]["diff_ids"][1].as_str().unwrap()
    );

    // docker-archive → OCI layout: OCI media types, and a tag from the DST reference.
    let oci = at(t.path(), "oci", "o:v2");
    let mut img = read(&dst, None).unwrap();
    write(&img, &oci).unwrap();
    let o = read_checked(&r(&format!("oci:{}:v2", t.path().join("o").display())));
    assert_eq!(o.manifest.as_ref().unwrap().media_type, media::OCI_MANIFEST);
    assert_eq!(
        o.layers[1].descriptor.as_ref().unwrap()["mediaType"],
        media::OCI_LAYER
    );
    // ... and back; nothing to inject twice.
    let out = inject(&mut img, &opts(&static_bin(), &[])).unwrap();
    assert!(matches!(
        out,
        Outcome::AlreadyInjected {
            by_waypost: true,
            ..
        }
    ));
}

/// gzip's `-c` of a file, in several members (as pigz writes), to check they are all read.
fn gzip_members(data: &[u8], members: usize) -> Vec<u8> {
    use std::io::Write as _;
    let mut out = Vec::new();
    for part in data.chunks(data.len().div_ceil(members)) {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(part).unwrap();
        out.extend(enc.finish().unwrap());
    }
    out
}

#[test]
fn gzipped_archives_are_read_through_a_temporary_copy() {
    let t = tempfile::tempdir().unwrap();
    let src = at(t.path(), "docker-archive", "base.tar:localhost/app:1");
    make_image(&src, json!(["/bin/app"]), json!(["serve"]), Flavor::Oci);
    let plain = std::fs::read(t.path().join("base.tar")).unwrap();
    std::fs::write(t.path().join("base.tar.gz"), gzip_members(&plain, 3)).unwrap();
    let gz = at(t.path(), "docker-archive", "base.tar.gz");
    let dst = at(t.path(), "oci-archive", "out.tar");
    let mut img = read(&gz, Some("amd64")).unwrap();
    assert_eq!(img.name.as_deref(), Some("localhost/app:1"));
    assert!(
        img.notes.iter().any(|n| n.contains("gzip-compressed")),
        "{:?}",
        img.notes
    );
    inject(&mut img, &opts(&static_bin(), &[])).unwrap();
    write(&img, &dst).unwrap();
    drop(img);
    let out = read_checked(&dst);
    assert_eq!(out.layers.len(), 2);
    assert_eq!(
        out.entrypoint_and_cmd().unwrap().0,
        vec!["/waypost-entrypoint".to_string(), "/bin/app".into()]
    );
    // A corrupt gzip stream is an error naming the file, not a panic or a partial image.
    let mut bad = gzip_members(&plain, 1);
    let n = bad.len();
    bad.truncate(n / 2);
    std::fs::write(t.path().join("bad.tar.gz"), bad).unwrap();
    let e = format!(
        "{:#}",
        read(&at(t.path(), "docker-archive", "bad.tar.gz"), None).unwrap_err()
    );
    assert!(e.contains("bad.tar.gz"), "{e}");
    // The decompressed copies are gone, after success and after failure.
    let left: Vec<_> = std::fs::read_dir(t.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("gunzip"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn docker_flavored_oci_layout_keeps_docker_media_types() {
    let t = tempfile::tempdir().unwrap();
    let src = at(t.path(), "oci", "base");
    make_image(&src, json!(["/bin/app"]), Value::Null, Flavor::Docker);
    let dst = at(t.path(), "oci-archive", "out.tar");
    inject_cli(&src, &dst, &static_bin(), &[]);
    let img = read_checked(&dst);
    let m = img.manifest.as_ref().unwrap();
    assert_eq!(m.media_type, media::DOCKER_MANIFEST);
    assert_eq!(m.value["config"]["mediaType"], media::DOCKER_CONFIG);
    assert_eq!(m.value["layers"][1]["mediaType"], media::DOCKER_LAYER_GZIP);
}

#[test]
fn oci_to_docker_archive_decompresses_layers() {
    let t = tempfile::tempdir().unwrap();
    let src = at(t.path(), "oci-archive", "base.tar:latest");
    make_image(&src, json!(["/bin/app"]), Value::Null, Flavor::Oci);
    let dst = at(t.path(), "docker-archive", "out.tar:app");
    inject_cli(&src, &dst, &static_bin(), &[]);
    let img = read_checked(&dst);
    assert_eq!(img.name.as_deref(), Some("app:latest"));
    let cfg = img.config_json().unwrap();
    for (l, d) in img
        .layers
        .iter()
        .zip(cfg["rootfs"]["diff_ids"].as_array().unwrap())
    {
        assert_eq!(l.compression, Compression::None);
        assert_eq!(
            l.digest,
            d.as_str().unwrap(),
            "uncompressed: digest == diff_id"
        );
    }
}

#[test]
fn tags_select_images_and_bad_destinations_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let src = at(t.path(), "oci", "base:v1");
    make_image(&src, json!(["/bin/app"]), Value::Null, Flavor::Oci);
    assert!(
        read(
            &r(&format!("oci:{}:v1", t.path().join("base").display())),
            None
        )
        .is_ok()
    );
    let e = read(
        &r(&format!("oci:{}:nope", t.path().join("base").display())),
        None,
    )
    .unwrap_err();
    assert!(format!("{e:#}").contains("v1"), "{e:#}");
    // DST == SRC, DST inside SRC, DST a foreign directory.
    let e = check_destination(&src, &src).unwrap_err().to_string();
    assert!(e.contains("never modifies its source"), "{e}");
    assert!(check_destination(&src, &at(&t.path().join("base"), "oci-archive", "x.tar")).is_err());
    std::fs::create_dir(t.path().join("stuff")).unwrap();
    std::fs::write(t.path().join("stuff/keep"), "x").unwrap();
    assert!(check_destination(&src, &at(t.path(), "oci", "stuff")).is_err());
    // An existing layout is replaced whole.
    let dst = at(t.path(), "oci", "out");
    inject_cli(&src, &dst, &static_bin(), &[]);
    inject_cli(&src, &dst, &static_bin(), &[]);
    assert_eq!(read_checked(&dst).layers.len(), 2);
    // Wrong transport for the file.
    assert!(
        read(
            &r(&format!(
                "docker-archive:{}",
                t.path().join("nope.tar").display()
            )),
            None
        )
        .is_err()
    );
    let oa = at(t.path(), "oci-archive", "oa.tar");
    write(&read(&src, None).unwrap(), &oa).unwrap();
    let e = read(&r(&format!("docker-archive:{}", oa.path.display())), None).unwrap_err();
    assert!(format!("{e:#}").contains("oci-archive:"), "{e:#}");
    // No temporary files left behind.
    let leftovers: Vec<_> = std::fs::read_dir(t.path())
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            n.contains("waypost-").then_some(n)
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn hand_built_image_with_the_entrypoint_is_left_alone() {
    let t = tempfile::tempdir().unwrap();
    let src = at(t.path(), "oci", "base");
    make_image(
        &src,
        json!(["/waypost-entrypoint"]),
        json!(["/bin/app"]),
        Flavor::Oci,
    );
    let dst = at(t.path(), "oci", "out");
    let out = inject_cli(&src, &dst, &static_bin(), &[]);
    assert!(
        matches!(
            out,
            Outcome::AlreadyInjected {
                by_waypost: false,
                ..
            }
        ),
        "{out:?}"
    );
    assert_eq!(file_hashes(&src.path), file_hashes(&dst.path));
    // --env on it changes only Env, and does not make it look injected by us.
    let env = [parse_env("A=1").unwrap()];
    let dst2 = at(t.path(), "oci", "out2");
    let out = inject_cli(&dst, &dst2, &static_bin(), &env);
    assert!(
        matches!(
            out,
            Outcome::AlreadyInjected {
                by_waypost: false,
                env_changed: true
            }
        ),
        "{out:?}"
    );
    let dst3 = at(t.path(), "oci", "out3");
    let out = inject_cli(&dst2, &dst3, &static_bin(), &[]);
    assert!(
        matches!(
            out,
            Outcome::AlreadyInjected {
                by_waypost: false,
                env_changed: false
            }
        ),
        "{out:?}"
    );
}

#[test]
fn multi_platform_index_picks_the_entrypoint_platform() {
    let t = tempfile::tempdir().unwrap();
    // Write a single image, then wrap its manifest in a nested index with an arm64 sibling.
    let one = at(t.path(), "oci", "img");
    make_image(&one, json!(["/bin/app"]), Value::Null, Flavor::Oci);
    let index: Value =
        serde_json::from_slice(&std::fs::read(one.path.join("index.json")).unwrap()).unwrap();
    let mut amd = index["manifests"][0].clone();
    amd["platform"] = json!({ "os": "linux", "architecture": "amd64" });
    let mut arm = amd.clone();
    arm["platform"]["architecture"] = json!("arm64");
    let nested = serde_json::to_vec(
        &json!({ "schemaVersion": 2, "mediaType": media::OCI_INDEX, "manifests": [arm, amd] }),
    )
    .unwrap();
    let nd = sha256_digest(&nested);
    std::fs::write(one.path.join(read::blob_name(&nd).unwrap()), &nested).unwrap();
    let top = json!({ "schemaVersion": 2, "manifests": [{ "mediaType": media::OCI_INDEX, "digest": nd, "size": nested.len() }] });
    std::fs::write(
        one.path.join("index.json"),
        serde_json::to_vec(&top).unwrap(),
    )
    .unwrap();
    let img = read(&one, Some("amd64")).unwrap();
    assert_eq!(img.notes.len(), 1, "{:?}", img.notes);
    let e = read(&one, Some("riscv64")).unwrap_err();
    assert!(format!("{e:#}").contains("linux/arm64"), "{e:#}");
}
