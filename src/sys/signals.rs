//! Signals arrive on one signalfd: every catchable signal is blocked and read from it, so the
//! reactor sees them as ordinary readable events and never runs code in a signal handler.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

/// Signals the entrypoint does not take over:
/// - faults raised synchronously by our own code (FPE, ILL, SEGV, BUS, ABRT, TRAP, SYS) keep their
///   default action, so a bug in the entrypoint crashes loudly instead of being swallowed;
/// - TTIN/TTOU are ignored: a background entrypoint touching its terminal must not be stopped;
/// - KILL and STOP cannot be caught.
const NOT_HANDLED: [i32; 11] = [
    libc::SIGFPE,
    libc::SIGILL,
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGABRT,
    libc::SIGTRAP,
    libc::SIGSYS,
    libc::SIGTTIN,
    libc::SIGTTOU,
    libc::SIGKILL,
    libc::SIGSTOP,
];

/// The set of handled signals.
pub struct SigSet(libc::sigset_t);

impl SigSet {
    /// Every signal except [`NOT_HANDLED`].
    pub fn handled() -> SigSet {
        let mut set = MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: sigfillset initialises the set it is given; sigdelset only modifies an
        // initialised set; the signal numbers are valid.
        unsafe {
            libc::sigfillset(set.as_mut_ptr());
            for sig in NOT_HANDLED {
                libc::sigdelset(set.as_mut_ptr(), sig);
            }
            SigSet(set.assume_init())
        }
    }
}

/// Signals that were ignored when we started (bit N-1 = signal N), minus SIGPIPE, which Rust's
/// runtime ignores before `main`. The child gets exactly these ignored, like a direct child would.
static INHERITED_IGNORED: AtomicU64 = AtomicU64::new(0);

/// Blocks `set` for the calling thread (before any other thread exists, so for the process).
pub fn block(set: &SigSet) -> io::Result<()> {
    let mut ignored = 0u64;
    for sig in 1..=64 {
        if sig != libc::SIGPIPE && kernel_disposition(sig, None) == Some(libc::SIG_IGN) {
            ignored |= 1 << (sig - 1);
        }
    }
    INHERITED_IGNORED.store(ignored, Ordering::Relaxed);
    // SAFETY: `set` is an initialised sigset; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set.0, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    // SAFETY: setting a disposition to SIG_IGN installs no handler code.
    unsafe {
        libc::signal(libc::SIGTTIN, libc::SIG_IGN);
        libc::signal(libc::SIGTTOU, libc::SIG_IGN);
    }
    Ok(())
}

/// A non-blocking, close-on-exec signalfd for `set` (which must be blocked).
pub fn signalfd(set: &SigSet) -> io::Result<OwnedFd> {
    // SAFETY: -1 asks for a new fd; `set` is initialised; the flags are valid.
    let fd = unsafe { libc::signalfd(-1, &set.0, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: signalfd returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Signals read per call of [`read_batch`].
pub const BATCH: usize = 8;

/// Reads up to [`BATCH`] pending signal numbers from `fd` into `out`; returns how many (0: none
/// pending).
pub fn read_batch(fd: impl AsFd, out: &mut [i32; BATCH]) -> io::Result<usize> {
    let rec = std::mem::size_of::<libc::signalfd_siginfo>();
    let mut buf = [MaybeUninit::<libc::signalfd_siginfo>::uninit(); BATCH];
    loop {
        // SAFETY: the buffer is valid for BATCH records of writes; the kernel writes whole records.
        let n = unsafe { libc::read(fd.as_fd().as_raw_fd(), buf.as_mut_ptr().cast(), BATCH * rec) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock => return Ok(0),
                io::ErrorKind::Interrupted => continue,
                _ => return Err(e),
            }
        }
        let count = n as usize / rec;
        for (slot, r) in out.iter_mut().zip(&buf[..count]) {
            // SAFETY: the first `count` records were written by the kernel.
            *slot = unsafe { r.assume_init_ref() }.ssi_signo as i32;
        }
        return Ok(count);
    }
}

/// In a freshly forked child, before exec: the state it would have had as a direct child of our
/// parent — nothing blocked, and only the signals our parent ignored still ignored (ignored
/// dispositions survive exec; we ignore TTIN/TTOU, Rust's runtime ignores PIPE).
///
/// Only async-signal-safe calls: it runs between fork and exec.
pub fn reset_for_exec() -> io::Result<()> {
    let inherited = INHERITED_IGNORED.load(Ordering::Relaxed);
    let mut empty = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set; sigprocmask and signal are async-signal-safe.
    // Handlers are reset by exec anyway; signal() refuses KILL, STOP and libc-internal signals.
    unsafe {
        libc::sigemptyset(empty.as_mut_ptr());
        for sig in 1..=64 {
            if inherited & (1 << (sig - 1)) == 0 {
                kernel_disposition(sig, Some(libc::SIG_DFL));
            }
        }
        if libc::sigprocmask(libc::SIG_SETMASK, empty.as_ptr(), std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The kernel's `struct sigaction` (x86_64 and aarch64 layout), for the raw system call.
#[repr(C)]
struct KernelSigaction {
    handler: libc::sighandler_t,
    flags: libc::c_ulong,
    restorer: usize,
    mask: u64,
}

/// Queries (and with `set`, replaces by a plain handler value such as SIG_DFL) the disposition
/// of `sig` with the raw `rt_sigaction` call: libc wrappers refuse or hide the signals they use
/// internally, and those must be reset for the child too. Async-signal-safe.
fn kernel_disposition(sig: i32, set: Option<libc::sighandler_t>) -> Option<libc::sighandler_t> {
    let new = set.map(|h| KernelSigaction {
        handler: h,
        flags: 0,
        restorer: 0,
        mask: 0,
    });
    let mut old = KernelSigaction {
        handler: 0,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    let new_ptr = new
        .as_ref()
        .map_or(std::ptr::null(), |n| n as *const KernelSigaction);
    // SAFETY: both pointers are null or point at valid structs of the kernel's layout; the size
    // argument is the kernel's sigset size (8 bytes).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_rt_sigaction,
            sig,
            new_ptr,
            &mut old as *mut KernelSigaction,
            8usize,
        )
    };
    (rc == 0).then_some(old.handler)
}

/// `kill(2)`: `pid > 0` a process, `pid < 0` the process group `-pid`. Any signal number, including
/// real-time ones (which rustix's named `Signal` type does not cover).
pub fn kill(pid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(pid, sig) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Human name of a signal for log lines ("SIGTERM"), or its number.
pub fn name(sig: i32) -> String {
    match waypost_proto::signal::name(sig) {
        Some(known) => known.to_owned(),
        None => format!("signal {sig}"),
    }
}

/// Signal number for a name like `HUP`, `SIGHUP`, `sighup` or a number `1`.
pub fn from_name(s: &str) -> Option<i32> {
    waypost_proto::signal::from_name(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for sig in 1..32 {
            let n = name(sig);
            if let Some(short) = n.strip_prefix("SIG") {
                assert_eq!(from_name(&n), Some(sig), "{n}");
                assert_eq!(from_name(&short.to_lowercase()), Some(sig), "{n}");
            }
        }
        assert_eq!(from_name("HUP"), Some(libc::SIGHUP));
        assert_eq!(from_name("15"), Some(15));
        assert_eq!(from_name("SIGNOPE"), None);
        assert_eq!(from_name("0"), None);
        assert_eq!(name(40), "signal 40");
    }

    #[test]
    fn the_shared_table_matches_this_libc() {
        // waypost_proto::signal fixes Linux's generic numbers (the server names signals the
        // entrypoint reported from another machine); this target's libc must agree.
        let libc_names = [
            (libc::SIGHUP, "SIGHUP"),
            (libc::SIGINT, "SIGINT"),
            (libc::SIGQUIT, "SIGQUIT"),
            (libc::SIGILL, "SIGILL"),
            (libc::SIGTRAP, "SIGTRAP"),
            (libc::SIGABRT, "SIGABRT"),
            (libc::SIGBUS, "SIGBUS"),
            (libc::SIGFPE, "SIGFPE"),
            (libc::SIGKILL, "SIGKILL"),
            (libc::SIGUSR1, "SIGUSR1"),
            (libc::SIGSEGV, "SIGSEGV"),
            (libc::SIGUSR2, "SIGUSR2"),
            (libc::SIGPIPE, "SIGPIPE"),
            (libc::SIGALRM, "SIGALRM"),
            (libc::SIGTERM, "SIGTERM"),
            (libc::SIGSTKFLT, "SIGSTKFLT"),
            (libc::SIGCHLD, "SIGCHLD"),
            (libc::SIGCONT, "SIGCONT"),
            (libc::SIGSTOP, "SIGSTOP"),
            (libc::SIGTSTP, "SIGTSTP"),
            (libc::SIGTTIN, "SIGTTIN"),
            (libc::SIGTTOU, "SIGTTOU"),
            (libc::SIGURG, "SIGURG"),
            (libc::SIGXCPU, "SIGXCPU"),
            (libc::SIGXFSZ, "SIGXFSZ"),
            (libc::SIGVTALRM, "SIGVTALRM"),
            (libc::SIGPROF, "SIGPROF"),
            (libc::SIGWINCH, "SIGWINCH"),
            (libc::SIGIO, "SIGIO"),
            (libc::SIGPWR, "SIGPWR"),
            (libc::SIGSYS, "SIGSYS"),
        ];
        for (sig, n) in libc_names {
            assert_eq!(name(sig), n);
            assert_eq!(from_name(n), Some(sig));
        }
        assert_eq!(libc_names.len(), 31);
        assert!(libc::SIGRTMAX() <= waypost_proto::signal::MAX);
    }
}
