//! Keeping the entrypoint's own secrets out of reach of the app it runs.
//!
//! The app and every exec session usually run as the entrypoint's user, and a process may read
//! `/proc/PID/environ`, `/proc/PID/mem` and friends of any other process of its user. Two things
//! close that:
//!
//! - [`scrub`]: `/proc/PID/environ` shows the bytes of the environment block the kernel copied
//!   onto the initial stack at execve (between the mm's `env_start` and `env_end`), whatever
//!   libc's `environ` array points at now. Dropping a variable from `environ` (unsetenv) leaves
//!   those bytes where they are, so each secret `NAME=value` string is overwritten with zeros in
//!   place, and its pointer dropped from `environ` so nothing later reads a blanked entry.
//! - [`forbid_inspection`]: `PR_SET_DUMPABLE 0`. Our `/proc/PID/{environ,mem,maps,fd,...}` then
//!   belong to root and ptrace by a process of the same user is refused; and a crash leaves no
//!   core file holding the token. The child gets none of this: execve makes a process dumpable
//!   again (for a normal, readable program), so the app can still be debugged as usual.

use std::ffi::{CStr, c_char};
use std::io;

unsafe extern "C" {
    /// libc's environment (POSIX): a NULL-terminated array of `NAME=value` C strings. Both glibc
    /// and musl define it; the `libc` crate declares it for glibc only.
    static mut environ: *mut *mut c_char;
}

/// Blanks and removes every variable named in `names` from this process's environment, all
/// occurrences; returns how many entries went.
///
/// Call it while the process has one thread (the entrypoint does, right after parsing its
/// settings): nothing may read or change the environment meanwhile.
pub fn scrub(names: &[&str]) -> usize {
    // SAFETY: `environ` is libc's own, NULL-terminated array of writable C strings (strings the
    // kernel put on our stack, or that setenv allocated); we are the only thread, so nothing
    // reads or changes it during the call (this function's documented contract).
    unsafe { scrub_array(&raw mut environ, names) }
}

/// Whether `entry` (`NAME=value`, no NUL) is one of `names`.
fn is_named(entry: &[u8], names: &[&str]) -> bool {
    names
        .iter()
        .any(|n| entry.len() > n.len() && entry.starts_with(n.as_bytes()) && entry[n.len()] == b'=')
}

/// [`scrub`] on the environment array `*env`.
///
/// Why not unsetenv: musl's unsetenv frees an entry setenv had allocated, so zeroing it after
/// would write freed memory, and zeroing it before would hide its name from unsetenv. Instead
/// the array is compacted in place here, which is all unsetenv itself does to it; a string setenv
/// allocated is left allocated (blanked), never freed behind libc's back.
///
/// # Safety
/// `*env` is null or points to a NULL-terminated array of pointers to writable NUL-terminated
/// strings, and nothing else reads or writes the array or the strings during the call.
unsafe fn scrub_array(env: *mut *mut *mut c_char, names: &[&str]) -> usize {
    // SAFETY: the caller guarantees `env` is valid to read.
    let array = unsafe { *env };
    if array.is_null() {
        return 0;
    }
    let (mut read, mut kept, mut removed) = (0usize, 0usize, 0usize);
    loop {
        // SAFETY: `read` never passes the terminating NULL, which ends the loop.
        let entry = unsafe { *array.add(read) };
        if entry.is_null() {
            break;
        }
        // SAFETY: every entry is a valid NUL-terminated string (caller's contract).
        let len = unsafe { CStr::from_ptr(entry) }.to_bytes().len();
        // SAFETY: `len` bytes before its NUL belong to this string, and they are not borrowed
        // anywhere else (the CStr above is gone).
        let bytes = unsafe { std::slice::from_raw_parts(entry as *const u8, len) };
        if is_named(bytes, names) {
            // SAFETY: the `len` bytes of the string are writable (caller's contract); its NUL
            // terminator stays, so it remains a valid (empty) C string for anyone holding it.
            unsafe { std::ptr::write_bytes(entry, 0, len) };
            removed += 1;
        } else {
            // SAFETY: kept <= read, both inside the array.
            unsafe { *array.add(kept) = entry };
            kept += 1;
        }
        read += 1;
    }
    // SAFETY: kept <= read, the index of the old terminator, so still inside the array.
    unsafe { *array.add(kept) = std::ptr::null_mut() };
    removed
}

/// Marks the process non-dumpable (`PR_SET_DUMPABLE 0`); inherited by a forked child only until
/// its execve.
pub fn forbid_inspection() -> io::Result<()> {
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
        .map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;

    /// A private environment array over owned strings, as libc would have it.
    struct FakeEnv {
        strings: Vec<Vec<u8>>,
        array: Vec<*mut c_char>,
    }

    impl FakeEnv {
        fn new(entries: &[&str]) -> FakeEnv {
            let mut strings: Vec<Vec<u8>> = entries
                .iter()
                .map(|e| CString::new(*e).unwrap().into_bytes_with_nul())
                .collect();
            let mut array: Vec<*mut c_char> =
                strings.iter_mut().map(|s| s.as_mut_ptr().cast()).collect();
            array.push(std::ptr::null_mut());
            FakeEnv { strings, array }
        }

        fn scrub(&mut self, names: &[&str]) -> usize {
            let mut p = self.array.as_mut_ptr();
            // SAFETY: `p` points to our NULL-terminated array of pointers into `strings`, which
            // outlive the call; nothing else touches them.
            unsafe { scrub_array(&raw mut p, names) }
        }

        /// The entries still in the array, up to its terminator.
        fn listed(&self) -> Vec<String> {
            self.array
                .iter()
                .take_while(|p| !p.is_null())
                // SAFETY: every listed pointer points into one of `strings`, NUL-terminated.
                .map(|&p| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
                .collect()
        }
    }

    #[test]
    fn secrets_are_zeroed_in_place_and_unlisted() {
        let mut env = FakeEnv::new(&[
            "PATH=/bin",
            "WAYPOST_TOKEN=s3cret",
            "WAYPOST_TOKEN_X=keep",
            "WAYPOST_TOKEN=again",
            "HOME=/root",
        ]);
        assert_eq!(env.scrub(&["WAYPOST_TOKEN", "WAYPOINT_CEB_TOKEN"]), 2);
        assert_eq!(
            env.listed(),
            ["PATH=/bin", "WAYPOST_TOKEN_X=keep", "HOME=/root"],
            "order kept, terminator moved"
        );
        // The bytes where the secrets were (what /proc/PID/environ shows) are zeros now.
        assert_eq!(env.strings[1], [0u8; "WAYPOST_TOKEN=s3cret".len() + 1]);
        assert_eq!(env.strings[3], [0u8; "WAYPOST_TOKEN=again".len() + 1]);
        assert_eq!(
            env.strings[2], b"WAYPOST_TOKEN_X=keep\0",
            "a longer name that merely starts with a secret's is not one"
        );
    }

    #[test]
    fn names_match_exactly() {
        assert!(
            is_named(b"WAYPOST_TOKEN=", &["WAYPOST_TOKEN"]),
            "an empty secret is still removed"
        );
        for other in [
            &b"WAYPOST_TOKEN"[..],
            b"WAYPOST_TOKENS=x",
            b"XWAYPOST_TOKEN=x",
            b"waypost_token=x",
            b"",
        ] {
            assert!(
                !is_named(other, &["WAYPOST_TOKEN"]),
                "{:?}",
                String::from_utf8_lossy(other)
            );
        }
    }

    #[test]
    fn nothing_to_scrub_leaves_the_array_alone() {
        let mut env = FakeEnv::new(&["A=1", "B=2"]);
        assert_eq!(env.scrub(&["WAYPOST_TOKEN"]), 0);
        assert_eq!(env.listed(), ["A=1", "B=2"]);
        let mut empty = FakeEnv::new(&[]);
        assert_eq!(empty.scrub(&["WAYPOST_TOKEN"]), 0);
        let mut null: *mut *mut c_char = std::ptr::null_mut();
        // SAFETY: a null environment is allowed by the contract.
        assert_eq!(unsafe { scrub_array(&raw mut null, &["X"]) }, 0);
    }
}
