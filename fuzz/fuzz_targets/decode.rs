//! The frame decoder on arbitrary bytes: never panics, never consumes on error or on "need more",
//! and every frame it accepts re-encodes to a frame that decodes to the same value.
#![no_main]
use libfuzzer_sys::fuzz_target;
use waypost_proto::{Error, decode, encode, frame_len};

fuzz_target!(|data: &[u8]| {
    let mut input = data;
    loop {
        let before = input.len();
        match decode(&mut input) {
            None => {
                assert_eq!(input.len(), before);
                break;
            }
            Some(Err(e)) => {
                assert_eq!(input.len(), before);
                if let Error::TooLarge(_) = e {
                    assert!(matches!(frame_len(input), Some(Err(_))));
                }
                break;
            }
            Some(Ok(frame)) => {
                let used = before - input.len();
                assert_eq!(frame_len(&data[data.len() - before..]), Some(Ok(used)));
                let mut wire = Vec::new();
                encode(&frame, &mut wire).expect("a decoded frame re-encodes");
                let again = decode(&mut &wire[..]).expect("complete").expect("valid");
                assert_eq!(again, frame);
            }
        }
    }
});
