//! The decoder never allocates what a length field claims before the bytes are there: a hostile
//! peer announcing huge lengths costs nothing. Checked with a global allocator that records the
//! largest single allocation (its own test binary, so other tests are not affected).
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use waypost_proto::{Error, MAX_FRAME, decode};

struct Watch;
static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only records sizes.
unsafe impl GlobalAlloc for Watch {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Watch = Watch;

fn largest_during(f: impl FnOnce()) -> usize {
    LARGEST.store(0, Ordering::Relaxed);
    f();
    LARGEST.load(Ordering::Relaxed)
}

#[test]
fn hostile_lengths_allocate_nothing_large() {
    // Prefix far over the limit: an error from 4 bytes.
    let n = largest_during(|| {
        let wire = u32::MAX.to_be_bytes();
        assert_eq!(
            decode(&mut &wire[..]),
            Some(Err(Error::TooLarge(u32::MAX as usize)))
        );
    });
    assert!(n < 1024, "largest allocation {n}");

    // A frame within the limit whose inner bytes field claims ~1 MiB but carries 3 bytes:
    // StreamData (field 17, LEN) containing data (field 2, LEN = 1_000_000).
    let mut inner = vec![0x12];
    let mut v = 1_000_000u32;
    while v >= 0x80 {
        inner.push((v as u8) | 0x80);
        v >>= 7;
    }
    inner.push(v as u8);
    inner.extend_from_slice(b"abc");
    let mut body = vec![0x8a, 0x01, inner.len() as u8];
    body.extend_from_slice(&inner);
    let mut wire = (body.len() as u32).to_be_bytes().to_vec();
    wire.extend_from_slice(&body);
    let n = largest_during(|| {
        assert!(matches!(
            decode(&mut &wire[..]),
            Some(Err(Error::Malformed(_)))
        ));
    });
    assert!(n < 1024, "largest allocation {n}");

    // A prefix of exactly MAX_FRAME with only a few body bytes present: "need more", no allocation.
    let mut wire = (MAX_FRAME as u32).to_be_bytes().to_vec();
    wire.extend_from_slice(&[0x0a, 0x00]);
    let n = largest_during(|| assert_eq!(decode(&mut &wire[..]), None));
    assert_eq!(n, 0);
}
