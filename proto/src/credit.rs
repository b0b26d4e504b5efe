//! Credit-based flow control of data-carrying streams (exec sessions, tunnel streams), sans-IO:
//! the arithmetic both ends do, without the buffers or the waiting (docs/protocol.md, "Flow
//! control").
//!
//! Each direction of each stream starts with [`INITIAL_WINDOW`] credits. The sender spends a
//! credit per payload byte and stops at zero ([`SendCredits`]); the receiver refuses data beyond
//! what it granted and grants credits back as its local end consumes ([`RecvWindow`]).

use crate::INITIAL_WINDOW;

/// The sending side: credits the peer granted and we have not spent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendCredits {
    credits: u32,
}

impl Default for SendCredits {
    fn default() -> Self {
        SendCredits {
            credits: INITIAL_WINDOW,
        }
    }
}

impl SendCredits {
    /// How many bytes may be sent now, at most `max` (0: wait for a grant).
    #[inline]
    pub fn budget(&self, max: usize) -> usize {
        (self.credits as usize).min(max)
    }

    /// `n` bytes were sent (within [`budget`](Self::budget)).
    #[inline]
    pub fn sent(&mut self, n: usize) {
        self.credits = self
            .credits
            .saturating_sub(u32::try_from(n).unwrap_or(u32::MAX));
    }

    /// The peer granted `credits` more (a WindowUpdate).
    #[inline]
    pub fn grant(&mut self, credits: u32) {
        self.credits = self.credits.saturating_add(credits);
    }
}

/// The peer sent more than it was granted, or data after its end: a protocol violation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overrun;

/// The receiving side: how much the peer may still send, and when to grant it more.
///
/// Credits go back once `grant_at` bytes were consumed since the last grant, or as soon as the
/// local end caught up (took everything buffered) while the peer's window is below half: batched,
/// so small reads do not each cost a WindowUpdate, yet a sender never stalls on a reader that
/// keeps up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecvWindow {
    /// Bytes the peer may still send.
    window: u32,
    /// Taken by the local end since we last granted credits back.
    consumed: u32,
    grant_at: u32,
}

impl RecvWindow {
    /// A fresh window of [`INITIAL_WINDOW`], granting back in batches of at least `grant_at`.
    pub const fn new(grant_at: u32) -> RecvWindow {
        RecvWindow {
            window: INITIAL_WINDOW,
            consumed: 0,
            grant_at,
        }
    }

    /// `n` bytes arrived from the peer; more than its window is an [`Overrun`] (and changes
    /// nothing).
    #[inline]
    pub fn received(&mut self, n: usize) -> Result<(), Overrun> {
        let n = u32::try_from(n).map_err(|_| Overrun)?;
        self.window = self.window.checked_sub(n).ok_or(Overrun)?;
        Ok(())
    }

    /// The local end took `n` bytes; `caught_up`: nothing received is left waiting for it.
    /// Returns the credits to grant the peer now, if it is time (the window is reopened by as
    /// much).
    #[inline]
    pub fn took(&mut self, n: usize, caught_up: bool) -> Option<u32> {
        self.consumed = self
            .consumed
            .saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
        if self.consumed > 0
            && (self.consumed >= self.grant_at || (caught_up && self.window < INITIAL_WINDOW / 2))
        {
            let grant = core::mem::take(&mut self.consumed);
            self.window = self.window.saturating_add(grant);
            return Some(grant);
        }
        None
    }

    /// What the peer may still send.
    pub fn window(&self) -> u32 {
        self.window
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::collections::VecDeque;

    const KIB: usize = 1024;

    #[test]
    fn a_sender_never_exceeds_the_grant() {
        let mut o = SendCredits::default();
        let mut total = 0;
        while o.budget(16 * KIB) > 0 {
            let n = o.budget(16 * KIB);
            o.sent(n);
            total += n;
        }
        assert_eq!(total, INITIAL_WINDOW as usize);
        o.grant(10);
        assert_eq!(o.budget(16 * KIB), 10);
        o.sent(100); // more than the budget: clamps at zero rather than wrapping
        assert_eq!(o.budget(16 * KIB), 0);
        o.grant(u32::MAX);
        o.grant(u32::MAX);
        assert_eq!(o.budget(usize::MAX), u32::MAX as usize, "saturates");
    }

    #[test]
    fn the_receiver_refuses_beyond_the_window_and_grants_at_half() {
        let mut w = RecvWindow::new(INITIAL_WINDOW / 2);
        for _ in 0..4 {
            w.received(64 * KIB).unwrap();
        }
        assert_eq!(w.received(1), Err(Overrun));
        assert_eq!(w.window(), 0, "an overrun changes nothing");
        assert_eq!(w.took(100 * KIB, false), None);
        assert_eq!(w.took(28 * KIB, false), Some(128 * 1024));
        w.received(64 * KIB).unwrap();
        w.received(64 * KIB).unwrap();
        assert_eq!(w.received(1), Err(Overrun));
        assert_eq!(w.received(usize::MAX), Err(Overrun));
    }

    #[test]
    fn caught_up_below_half_grants_at_once() {
        let mut w = RecvWindow::new(64 * KIB as u32);
        w.received(200 * KIB).unwrap();
        // Caught up but the window is still above half: wait for a batch.
        let mut w2 = RecvWindow::new(64 * KIB as u32);
        w2.received(10).unwrap();
        assert_eq!(w2.took(10, true), None);
        // Below half and caught up: everything consumed goes back now.
        assert_eq!(w.took(1000, true), Some(1000));
        assert_eq!(w.window(), INITIAL_WINDOW - 200 * 1024 + 1000);
        // Batches of grant_at while behind.
        assert_eq!(w.took(60 * KIB, false), None);
        assert_eq!(w.took(4 * KIB, false), Some(64 * 1024));
        // Nothing consumed, nothing granted.
        assert_eq!(w.took(0, true), None);
    }

    /// Two ends on a fake clock: a sender that offers `send` bytes per tick (as far as its credits
    /// allow), a receiver whose local end takes `take` bytes per tick. Returns (delivered, most
    /// ever buffered at the receiver).
    fn run(grant_at: u32, send: usize, take: usize, ticks: usize) -> (usize, usize) {
        let mut tx = SendCredits::default();
        let mut rx = RecvWindow::new(grant_at);
        let mut buffered = 0usize;
        let mut peak = 0;
        let mut delivered = 0;
        // WindowUpdates in flight take one tick.
        let mut updates: VecDeque<(usize, u32)> = VecDeque::new();
        for now in 0..ticks {
            while updates.front().is_some_and(|&(at, _)| at <= now) {
                tx.grant(updates.pop_front().unwrap().1);
            }
            let n = tx.budget(send);
            tx.sent(n);
            rx.received(n).expect("the sender stays within its credits");
            buffered += n;
            peak = peak.max(buffered);
            let took = buffered.min(take);
            buffered -= took;
            delivered += took;
            if let Some(g) = rx.took(took, buffered == 0) {
                updates.push_back((now + 1, g));
            }
        }
        (delivered, peak)
    }

    #[test]
    fn end_to_end_bounded_and_never_stalled() {
        for grant_at in [INITIAL_WINDOW / 2, 64 * KIB as u32] {
            // A fast reader: the stream runs at the sender's pace, 16 KiB per tick.
            let (delivered, peak) = run(grant_at, 16 * KIB, usize::MAX, 1000);
            assert_eq!(delivered, 1000 * 16 * KIB, "grant_at {grant_at}");
            assert!(peak <= 16 * KIB);
            // A slow reader: memory bounded by one window, and it is never starved.
            let (delivered, peak) = run(grant_at, 16 * KIB, 1000, 1000);
            assert!(
                peak <= INITIAL_WINDOW as usize,
                "grant_at {grant_at}: {peak}"
            );
            assert!(delivered >= 999 * 1000, "grant_at {grant_at}: {delivered}");
            // A trickle (keystrokes) gets its credits back before the window closes: never
            // delayed, although no batch of grant_at bytes is ever consumed at once.
            let (delivered, peak) = run(grant_at, 4, usize::MAX, 200_000);
            assert_eq!(delivered, 4 * 200_000, "grant_at {grant_at}");
            assert_eq!(peak, 4);
        }
    }
}
