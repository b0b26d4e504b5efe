//! The generated Message impls (proto/build.rs) speak standard protobuf: checked against
//! prost-reflect's dynamic messages driven by the same .proto, and against encodings worked out
//! by hand from the protobuf spec.
use protox::prost_reflect::{DescriptorPool, DynamicMessage, Value};
use waypost_proto::samples::every_kind;
use waypost_proto::{Frame, Kind, Message, Ping};

fn pool() -> DescriptorPool {
    let dir = env!("CARGO_MANIFEST_DIR");
    let fds = protox::compile([format!("{dir}/waypost.proto")], [dir]).unwrap();
    DescriptorPool::from_file_descriptor_set(fds).unwrap()
}

#[test]
fn every_frame_is_read_identically_by_an_independent_implementation() {
    let desc = pool().get_message_by_name("waypost.v1.Frame").unwrap();
    for frame in every_kind() {
        let ours = frame.encode_to_vec();
        let dynamic = DynamicMessage::decode(desc.clone(), &ours[..]).expect("standard protobuf");
        // No field of ours landed in "unknown fields": every tag and wire type matched the schema.
        let mut unknown = dynamic.unknown_fields().count();
        for (_, v) in dynamic.fields() {
            if let Value::Message(m) = v {
                unknown += m.unknown_fields().count();
            }
        }
        assert_eq!(unknown, 0, "{frame:?}");
        // Both encoders are canonical (field-number order, defaults omitted): byte-identical —
        // except for frames holding a map with several entries, which prost-reflect writes in
        // hash order; those are compared after decoding.
        let theirs = dynamic.encode_to_vec();
        assert_eq!(Frame::decode(&theirs[..]).unwrap(), frame);
        if !matches!(
            frame.kind,
            Some(Kind::Config(_) | Kind::Welcome(_) | Kind::ExecStart(_))
        ) {
            assert_eq!(theirs, ours, "{frame:?}");
        }
    }
}

#[test]
fn field_values_are_where_the_schema_says() {
    let desc = pool().get_message_by_name("waypost.v1.Frame").unwrap();
    let hello = every_kind()
        .into_iter()
        .find(|f| matches!(f.kind, Some(Kind::Hello(_))))
        .unwrap();
    let dynamic = DynamicMessage::decode(desc, &hello.encode_to_vec()[..]).unwrap();
    let h = dynamic.get_field_by_name("hello").unwrap();
    let h = h.as_message().unwrap();
    assert_eq!(h.get_field_by_name("token").unwrap().as_str(), Some("tok"));
    assert_eq!(h.get_field_by_name("pid").unwrap().as_u32(), Some(1));
    assert_eq!(
        h.get_field_by_name("next_log_seq").unwrap().as_u64(),
        Some(100)
    );
    assert_eq!(
        h.get_field_by_name("instance_id")
            .unwrap()
            .as_bytes()
            .map(|b| b.to_vec()),
        Some(vec![0xab; 16])
    );
    let disabled = h.get_field_by_name("disabled").unwrap();
    let disabled = disabled.as_message().unwrap();
    assert_eq!(
        disabled.get_field_by_name("exec").unwrap().as_bool(),
        Some(true)
    );
    assert_eq!(
        disabled.get_field_by_name("logs").unwrap().as_bool(),
        Some(false)
    );
    let labels = h.get_field_by_name("labels").unwrap();
    let labels = labels.as_map().unwrap();
    assert_eq!(labels.len(), 1);
    assert_eq!(
        labels
            .get(&protox::prost_reflect::MapKey::String("env".into()))
            .and_then(|v| v.as_str()),
        Some("prod")
    );
    let status = h.get_field_by_name("status").unwrap();
    let state = status
        .as_message()
        .unwrap()
        .get_field_by_name("state")
        .unwrap();
    assert_eq!(state.as_enum_number(), Some(2), "RUNNING");
}

#[test]
fn hand_worked_encodings() {
    // Ping{nonce: 150} in Frame field 20: key (20<<3)|2 = 162 = a2 01, length 3,
    // inner key (1<<3)|0 = 08, varint 150 = 96 01.
    let ping = Frame::from(Kind::Ping(Ping { nonce: 150 }));
    assert_eq!(ping.encode_to_vec(), [0xa2, 0x01, 0x03, 0x08, 0x96, 0x01]);
    // Defaults are omitted: Ping{nonce: 0} is an empty message in field 20.
    assert_eq!(
        Frame::from(Kind::Ping(Ping { nonce: 0 })).encode_to_vec(),
        [0xa2, 0x01, 0x00]
    );
    // Config{version: 1, env: {"A": "1"}} in field 4: version 08 01; map entry in field 2:
    // 12 06 | key 0a 01 'A' | value 12 01 '1'.
    let cfg = waypost_proto::Config {
        version: 1,
        env: [("A".into(), "1".into())].into(),
        ..Default::default()
    };
    assert_eq!(
        Frame::from(Kind::Config(cfg)).encode_to_vec(),
        [
            0x22, 0x0a, 0x08, 0x01, 0x12, 0x06, 0x0a, 0x01, b'A', 0x12, 0x01, b'1'
        ]
    );
}

/// Writes the fuzzers' seed corpus (one file per sample frame) when asked:
/// `WAYPOST_WRITE_SEEDS=1 cargo test -p waypost-proto --test compat write_fuzz_seeds`.
#[test]
fn write_fuzz_seeds() {
    let Some(_) = std::env::var_os("WAYPOST_WRITE_SEEDS") else {
        return;
    };
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/decode");
    std::fs::create_dir_all(&dir).unwrap();
    for (i, frame) in every_kind().iter().enumerate() {
        let mut wire = Vec::new();
        waypost_proto::encode(frame, &mut wire).unwrap();
        std::fs::write(dir.join(format!("seed-{i:02}")), wire).unwrap();
    }
}
