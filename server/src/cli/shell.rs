//! What the shell and `man` know of the CLI, generated from its clap definitions so they never
//! drift from it: `waypost completion bash|zsh|fish` and the hidden `waypost __man DIR` behind
//! `make man` (one roff page per command: `waypost.1`, `waypost-config.1`, `waypost-config-set.1`,
//! …).

use anyhow::{Context as _, Result};
use clap::{Args, CommandFactory as _, ValueEnum};
use std::path::{Path, PathBuf};

/// The shells `waypost completion` writes scripts for.
#[derive(Clone, Copy, ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Args)]
#[command(after_help = "Load it now:   source <(waypost completion bash)
Install it:    waypost completion bash > ~/.local/share/bash-completion/completions/waypost
               waypost completion zsh > \"${fpath[1]}/_waypost\"
               waypost completion fish > ~/.config/fish/completions/waypost.fish")]
pub struct CompletionArgs {
    shell: Shell,
}

/// Writes the completion script of `a.shell` to stdout.
pub fn completion(a: CompletionArgs) -> Result<()> {
    let shell = match a.shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut visible_command(), "waypost", &mut out);
    use std::io::Write as _;
    match std::io::stdout().lock().write_all(&out) {
        // `| head` is not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("writing the completion script"),
    }
}

/// The CLI as users see it: clap_complete offers hidden subcommands too (`__detach`, `__man`),
/// so the command is rebuilt without them (they are all top-level; the top level has no
/// arguments of its own besides --help/--version).
fn visible_command() -> clap::Command {
    let full = super::Cli::command();
    // The version `#[command(version)]` gives the full command.
    let mut cmd = clap::Command::new("waypost").version(env!("CARGO_PKG_VERSION"));
    if let Some(a) = full.get_about() {
        cmd = cmd.about(a.clone());
    }
    cmd.subcommands(full.get_subcommands().filter(|s| !s.is_hide_set()).cloned())
}

/// Writes the man pages into `dir` (created if missing); returns their paths, sorted.
pub fn man_pages(dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // Hidden commands (`__detach`, `__man`) get no page: generate_to skips them.
    clap_mangen::generate_to(super::Cli::command(), dir)
        .with_context(|| format!("writing man pages into {}", dir.display()))?;
    let mut pages: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("waypost") && n.ends_with(".1"))
        })
        .collect();
    pages.sort();
    Ok(pages)
}

/// `waypost __man DIR`: the pages, and a line saying where they are.
pub fn man(dir: &Path) -> Result<()> {
    let pages = man_pages(dir)?;
    eprintln!(
        "wrote {} man pages into {} (read one with: man -l {})",
        pages.len(),
        dir.display(),
        dir.join("waypost.1").display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_per_visible_command_with_the_usual_sections() {
        let dir = tempfile::tempdir().unwrap();
        let pages = man_pages(dir.path()).unwrap();
        let names: Vec<String> = pages
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for want in [
            "waypost.1",
            "waypost-config.1",
            "waypost-config-set.1",
            "waypost-app-delete.1",
            "waypost-completion.1",
            "waypost-instances.1",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
        }
        assert!(
            !names.iter().any(|n| n.contains("__")),
            "hidden commands get no page: {names:?}"
        );
        let top = std::fs::read_to_string(dir.path().join("waypost.1")).unwrap();
        assert!(
            top.starts_with(".ie") || top.starts_with(".TH"),
            "{top:.200}"
        );
        for section in [
            ".TH waypost 1",
            ".SH NAME",
            ".SH SYNOPSIS",
            ".SH DESCRIPTION",
        ] {
            assert!(top.contains(section), "{section} in waypost.1");
        }
        let page = std::fs::read_to_string(dir.path().join("waypost-app-delete.1")).unwrap();
        assert!(page.contains("\\-\\-force"), "{page}");
    }
}
