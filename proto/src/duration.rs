//! The one duration syntax of waypost: entrypoint variables (`WAYPOST_STOP_TIMEOUT=30s`) and CLI
//! flags (`--splay 10s`, `--since 1.5h`, `--ttl 30d`) alike.

use alloc::format;
use alloc::string::String;
use core::time::Duration;

/// Parses a duration.
///
/// Grammar (surrounding whitespace ignored, nothing else):
///
/// ```text
/// duration = number                  a bare number is seconds: "30", "1.5"
///          | (number unit)+          summed: "1m30s", "1h30m", "2d12h"
/// number   = digits ["." [digits]] | "." digits       "5", "1.5", "5.", ".25"
/// unit     = "ms" | "s" | "sec" | "m" | "min" | "h" | "d"      (lower case)
/// ```
///
/// Exact: decimals are computed in integers, never floating point, so `0.1s` is 100 ms exactly
/// and `1.5ms` is 1,500 µs; digits finer than a nanosecond are dropped. No sign, no exponent, no
/// space between a number and its unit. A value beyond `u64::MAX` milliseconds (half a billion
/// years) is refused as too large. The error names the input and what is wrong with it.
///
/// ```
/// use core::time::Duration;
/// use waypost_proto::parse_duration;
/// assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
/// assert_eq!(parse_duration("0.1s"), Ok(Duration::from_millis(100)));
/// assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(2 * 86_400)));
/// assert_eq!(parse_duration("15"), Ok(Duration::from_secs(15)));
/// assert!(parse_duration("5x").unwrap_err().starts_with("\"5x\" is not a duration: unknown unit"));
/// ```
// #[inline]: as for `parse_size`, a cross-crate call costs the entrypoint more bytes than the
// body it calls once.
#[inline]
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err(error(s, "it is empty"));
    }
    let mut total = Duration::ZERO;
    let mut rest = t;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, tail) = rest.split_at(num_end);
        let unit_end = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        if num.is_empty() {
            return Err(error(s, "expected a number"));
        }
        let unit_ms: u64 = match unit {
            // Only a number standing alone may omit its unit: "1m30" is more likely a typo.
            "" if num.len() == t.len() => 1_000,
            "" => {
                return Err(error(
                    s,
                    "a number without a unit (only a number alone means seconds)",
                ));
            }
            "ms" => 1,
            "s" | "sec" => 1_000,
            "m" | "min" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(error(s, "unknown unit (use ms, s, m, h or d)")),
        };
        let (int, frac) = num.split_once('.').unwrap_or((num, ""));
        if frac.contains('.') {
            return Err(error(s, "a number with two decimal points"));
        }
        if int.is_empty() && frac.is_empty() {
            return Err(error(s, "a lone \".\" is not a number"));
        }
        let too_large = || error(s, "it is too large");
        // INVARIANT: `int` is ASCII digits only, so parsing fails only on overflow.
        let int: u64 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| too_large())?
        };
        // The fraction of one unit, in nanoseconds, exactly (floor), by long division from the
        // last digit: acc = floor((digit × unit + acc) / 10) keeps acc < unit (≤ 8.64e13 ns), so
        // u64 never overflows, however many digits there are.
        let unit_ns = unit_ms * 1_000_000;
        let frac_ns = frac
            .bytes()
            .rev()
            .fold(0u64, |acc, d| (u64::from(d - b'0') * unit_ns + acc) / 10);
        let part = int
            .checked_mul(unit_ms)
            .map(Duration::from_millis)
            .ok_or_else(too_large)?;
        total = total
            .checked_add(part)
            .and_then(|t| t.checked_add(Duration::from_nanos(frac_ns)))
            .filter(|t| t.as_millis() <= u128::from(u64::MAX))
            .ok_or_else(too_large)?;
        rest = tail;
    }
    Ok(total)
}

fn error(input: &str, why: &str) -> String {
    format!(
        "{input:?} is not a duration: {why} (examples: 500ms, 1.5s, 1m30s, 2h, 1d; a bare number is seconds)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn what_the_entrypoint_and_the_cli_both_accepted() {
        let ok = [
            // The entrypoint's variables before the grammars were merged.
            ("500ms", ms(500)),
            ("5s", ms(5_000)),
            ("2m", ms(120_000)),
            ("1h", ms(3_600_000)),
            ("1m30s", ms(90_000)),
            ("1.5s", ms(1_500)),
            ("0.25m", ms(15_000)),
            ("30", ms(30_000)),
            (" 0s ", ms(0)),
            (".5s", ms(500)),
            ("5.s", ms(5_000)),
            // The CLI's flags before the grammars were merged.
            ("300ms", ms(300)),
            ("15s", ms(15_000)),
            ("15", ms(15_000)),
            ("1h30m", ms(5_400_000)),
            ("1d", ms(86_400_000)),
            ("2sec", ms(2_000)),
            ("3min", ms(180_000)),
            ("1.5", ms(1_500)),
            ("0.5", ms(500)),
            (".5", ms(500)),
            ("5.", ms(5_000)),
            ("1.2345s", Duration::from_micros(1_234_500)),
            ("30s1m", ms(90_000)),
            ("1s1s", ms(2_000)),
        ];
        for (s, want) in ok {
            assert_eq!(parse_duration(s), Ok(want), "{s:?}");
        }
    }

    #[test]
    fn exact_without_floating_point() {
        assert_eq!(parse_duration("0.1s"), Ok(ms(100)));
        assert_eq!(parse_duration("0.3"), Ok(ms(300)));
        assert_eq!(parse_duration("1.5ms"), Ok(Duration::from_micros(1_500)));
        assert_eq!(parse_duration("0.001ms"), Ok(Duration::from_nanos(1_000)));
        assert_eq!(parse_duration("1.1d"), Ok(Duration::from_secs(95_040)));
        assert_eq!(parse_duration("0.000000001s"), Ok(Duration::from_nanos(1)));
        // Finer than a nanosecond: dropped (floor), however many digits.
        assert_eq!(parse_duration("0.0000000019s"), Ok(Duration::from_nanos(1)));
        assert_eq!(
            parse_duration("0.99999999999999999999999999s"),
            Ok(Duration::from_nanos(999_999_999))
        );
        assert_eq!(
            parse_duration("0.0000000000001d"),
            Ok(Duration::from_nanos(8))
        );
        assert_eq!(parse_duration("0.00000000000001d"), Ok(Duration::ZERO));
        assert_eq!(
            parse_duration("0.000000001d"),
            Ok(Duration::from_nanos(86_400))
        );
        // The largest value: u64::MAX milliseconds.
        assert_eq!(
            parse_duration(&alloc::format!("{}ms", u64::MAX)),
            Ok(ms(u64::MAX))
        );
    }

    #[test]
    fn refused_with_a_reason() {
        let bad = [
            ("", "empty"),
            ("   ", "empty"),
            ("abc", "expected a number"),
            ("5x", "unknown unit"),
            ("5S", "unknown unit"),
            ("ms", "expected a number"),
            ("-1s", "expected a number"),
            ("+5", "expected a number"),
            ("1e3", "unknown unit"),
            ("1.2.3s", "two decimal points"),
            ("s5", "expected a number"),
            ("5 s", "unknown unit"),
            ("1m 30s", "unknown unit"),
            (".s", "lone"),
            ("1m30", "without a unit"),
            ("99999999999999999h", "too large"),
            ("99999999999999999999", "too large"),
            ("18446744073709551616ms", "too large"),
            ("18446744073709551615ms1ms", "too large"),
            ("inf", "expected a number"),
        ];
        for (s, why) in bad {
            let e = parse_duration(s).expect_err(s);
            assert!(e.contains(why), "{s:?}: {e}");
            assert!(
                e.starts_with(&alloc::format!("{s:?} is not a duration")),
                "{e}"
            );
            assert!(e.contains("examples: 500ms"), "{e}");
        }
    }
}
