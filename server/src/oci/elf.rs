//! Just enough ELF to refuse an entrypoint binary that cannot run in a `FROM scratch` image:
//! it must be an ELF executable with no program interpreter (`PT_INTERP`), i.e. statically
//! linked (static-pie is fine: it has `PT_DYNAMIC` but no interpreter).

/// What we learned from the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfInfo {
    /// The OCI/Go architecture name (`amd64`, `arm64`, ...), if we know the machine.
    pub arch: Option<&'static str>,
    pub machine: u16,
}

const PT_INTERP: u32 = 3;

fn oci_arch(machine: u16, class64: bool) -> Option<&'static str> {
    Some(match (machine, class64) {
        (62, true) => "amd64",
        (3, false) => "386",
        (183, true) => "arm64",
        (40, false) => "arm",
        (243, true) => "riscv64",
        (21, true) => "ppc64le",
        (22, true) => "s390x",
        _ => return None,
    })
}

/// Checks that `b` is a statically linked ELF executable. The error says what is wrong in
/// words a user can act on.
pub fn check_static(b: &[u8]) -> Result<ElfInfo, String> {
    if b.len() < 52 || b[..4] != *b"\x7fELF" {
        return Err("not an ELF executable".into());
    }
    let class64 = match b[4] {
        1 => false,
        2 => true,
        c => return Err(format!("unknown ELF class {c}")),
    };
    let le = match b[5] {
        1 => true,
        2 => false,
        d => return Err(format!("unknown ELF byte order {d}")),
    };
    let u16_at = |o: usize| -> Option<u16> {
        let s: [u8; 2] = b.get(o..o.checked_add(2)?)?.try_into().ok()?;
        Some(if le {
            u16::from_le_bytes(s)
        } else {
            u16::from_be_bytes(s)
        })
    };
    let u32_at = |o: usize| -> Option<u32> {
        let s: [u8; 4] = b.get(o..o.checked_add(4)?)?.try_into().ok()?;
        Some(if le {
            u32::from_le_bytes(s)
        } else {
            u32::from_be_bytes(s)
        })
    };
    let u64_at = |o: usize| -> Option<u64> {
        let s: [u8; 8] = b.get(o..o.checked_add(8)?)?.try_into().ok()?;
        Some(if le {
            u64::from_le_bytes(s)
        } else {
            u64::from_be_bytes(s)
        })
    };
    let truncated = || "truncated ELF header".to_string();
    let e_type = u16_at(16).ok_or_else(truncated)?;
    // ET_EXEC (2) or ET_DYN (3: PIE / static-pie); anything else is an object file or core.
    if e_type != 2 && e_type != 3 {
        return Err(format!("ELF type {e_type} is not an executable"));
    }
    let machine = u16_at(18).ok_or_else(truncated)?;
    let (phoff, phentsize, phnum) = if class64 {
        (
            u64_at(0x20).ok_or_else(truncated)?,
            u16_at(0x36).ok_or_else(truncated)?,
            u16_at(0x38).ok_or_else(truncated)?,
        )
    } else {
        (
            u64::from(u32_at(0x1c).ok_or_else(truncated)?),
            u16_at(0x2a).ok_or_else(truncated)?,
            u16_at(0x2c).ok_or_else(truncated)?,
        )
    };
    if phnum == 0 {
        return Err("ELF file has no program headers (not an executable)".into());
    }
    for i in 0..u64::from(phnum) {
        let off = phoff
            .checked_add(i * u64::from(phentsize))
            .and_then(|o| usize::try_from(o).ok())
            .ok_or_else(truncated)?;
        let p_type = u32_at(off).ok_or("truncated ELF program headers")?;
        if p_type == PT_INTERP {
            return Err(
                "dynamically linked (it has a program interpreter, e.g. ld-linux.so): it cannot \
                 run in a FROM scratch image; use the static build from `make build` \
                 (target/x86_64-unknown-linux-musl/min/waypost-entrypoint)"
                    .into(),
            );
        }
    }
    Ok(ElfInfo {
        arch: oci_arch(machine, class64),
        machine,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::tests::fake_elf;

    #[test]
    fn static_elf_passes_and_reports_arch() {
        // PT_LOAD, PT_DYNAMIC (static-pie), PT_GNU_STACK.
        let info = check_static(&fake_elf(&[1, 2, 0x6474e551])).unwrap();
        assert_eq!(info.arch, Some("amd64"));
    }

    #[test]
    fn dynamic_elf_is_refused() {
        let e = check_static(&fake_elf(&[6, 3, 1])).unwrap_err();
        assert!(e.contains("dynamically linked"), "{e}");
    }

    #[test]
    fn garbage_is_refused() {
        assert!(check_static(b"#!/bin/sh\necho hi\n").is_err());
        assert!(check_static(&fake_elf(&[1])[..40]).is_err());
        let mut b = fake_elf(&[1]);
        b[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(check_static(&b).is_err());
    }

    #[test]
    fn the_running_test_binary_is_dynamic_or_static_but_parses() {
        // Whatever this test binary is, the parser must not panic on a real ELF file.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let _ = check_static(&me);
    }
}
