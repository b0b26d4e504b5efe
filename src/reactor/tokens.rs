//! Every registered fd as one enum ([`Tok`]) and its mio token number; the loop's dispatch is
//! an exhaustive `match` on it.

use crate::exec::MAX_SESSIONS;
use crate::sys::sink::Out;
use crate::tunnel::MAX_STREAMS;
use mio::Token;

/// First token number of exec sessions (4 per slot).
const EXEC_TOKENS: usize = 0x100;
/// First token number of URL-service streams (1 per slot).
const TUNNEL_TOKENS: usize = 0x1000;

/// Every registered fd, as one enum; dispatch is an exhaustive match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Tok {
    Signals,
    /// Our read end of the child's stdout/stderr pipe.
    ChildPipe(Out),
    /// Our own stdout/stderr, when writes to it can block.
    Sink(Out),
    /// The connection to the server (or its proxy).
    Control,
    /// Wake-ups from the DNS helper thread.
    Waker,
    /// An exec session's fd: slot, and which (0 stdin or PTY master, 1 stdout, 2 stderr).
    Exec(u8, u8),
    /// A URL-service stream's socket to the app, by slot.
    Tunnel(u16),
}

impl Tok {
    pub(super) fn token(self) -> Token {
        Token(match self {
            Tok::Signals => 0,
            Tok::ChildPipe(o) => 1 + o as usize,
            Tok::Sink(o) => 3 + o as usize,
            Tok::Control => 5,
            Tok::Waker => 6,
            Tok::Exec(slot, which) => EXEC_TOKENS + 4 * slot as usize + which as usize,
            Tok::Tunnel(slot) => TUNNEL_TOKENS + slot as usize,
        })
    }

    pub(super) fn from_token(t: Token) -> Option<Tok> {
        let out = |n| if n == 0 { Out::Stdout } else { Out::Stderr };
        Some(match t.0 {
            0 => Tok::Signals,
            t @ 1..=2 => Tok::ChildPipe(out(t - 1)),
            t @ 3..=4 => Tok::Sink(out(t - 3)),
            5 => Tok::Control,
            6 => Tok::Waker,
            t if (EXEC_TOKENS..EXEC_TOKENS + 4 * MAX_SESSIONS).contains(&t)
                && (t - EXEC_TOKENS) % 4 < 3 =>
            {
                Tok::Exec(((t - EXEC_TOKENS) / 4) as u8, ((t - EXEC_TOKENS) % 4) as u8)
            }
            t if (TUNNEL_TOKENS..TUNNEL_TOKENS + MAX_STREAMS).contains(&t) => {
                Tok::Tunnel((t - TUNNEL_TOKENS) as u16)
            }
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip() {
        let (o, e) = (Out::Stdout, Out::Stderr);
        for t in [
            Tok::Signals,
            Tok::ChildPipe(o),
            Tok::ChildPipe(e),
            Tok::Sink(o),
            Tok::Sink(e),
            Tok::Control,
            Tok::Waker,
            Tok::Exec(0, 0),
            Tok::Exec(15, 2),
            Tok::Exec(7, 1),
            Tok::Tunnel(0),
            Tok::Tunnel(1023),
        ] {
            assert_eq!(Tok::from_token(t.token()), Some(t));
        }
        assert_eq!(Tok::from_token(Token(999)), None);
    }
}
