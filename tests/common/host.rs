//! What the host must offer the tests that run real processes, and what a test does when it
//! does not: the CI rule (a missing precondition fails under `CI=true`, skips with a printed
//! reason elsewhere) and PID namespaces (`unshare`, the child's pid, PID 1). The standard
//! library only, so that the service example's tests share it too (`#[path]` from
//! `examples/service/tests/common/mod.rs`).

#![allow(dead_code, unreachable_pub)]

use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// Writes a line past the test harness's output capture, so it shows in `cargo test`.
pub fn say(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
}

// ---------------------------------------------------------------------------------------------
// Preconditions: a test that cannot pass by skipping under CI.
// ---------------------------------------------------------------------------------------------

/// Whether this is a CI run (`CI` set, and not to `false` or `0`): there a test may not skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.trim(), "" | "false" | "0"))
}

/// A test that cannot run here because `what` is missing (`reason` says why): under CI it
/// fails; elsewhere it prints why it is skipped, and the caller returns.
#[track_caller]
pub fn skip_or_fail(what: &str, reason: &str) {
    if in_ci() {
        panic!(
            "{what} is needed, and {reason}; under CI this fails instead of skipping (.ci/run \
             makes sure it is there)"
        );
    }
    say(&format!(
        "skipped: {what} is needed, and {reason} (under CI=true this fails)"
    ));
}

/// What a test needs, or `None` once [`skip_or_fail`] has said why it is missing (which fails
/// the test under CI): `let Some(x) = require("...", get()) else { return };`.
#[track_caller]
pub fn require<T>(what: &str, available: Result<T, String>) -> Option<T> {
    match available {
        Ok(value) => Some(value),
        Err(reason) => {
            skip_or_fail(what, &reason);
            None
        }
    }
}

// ---------------------------------------------------------------------------------------------
// PID namespaces.
// ---------------------------------------------------------------------------------------------

/// The `unshare` options that make a PID namespace here (without privileges, inside a user
/// namespace), or why none does.
pub fn pid_namespaces() -> Result<&'static [&'static str], String> {
    const WAYS: [&[&str]; 2] = [
        &["--pid", "--fork", "--kill-child"],
        &[
            "--user",
            "--map-root-user",
            "--pid",
            "--fork",
            "--kill-child",
        ],
    ];
    static SUPPORT: OnceLock<Result<&'static [&'static str], String>> = OnceLock::new();
    SUPPORT
        .get_or_init(|| {
            let mut refusals = Vec::new();
            for way in WAYS {
                let output = Command::new("unshare")
                    .args(way)
                    .arg("true")
                    .stdin(Stdio::null())
                    .output()
                    .map_err(|e| format!("cannot run unshare (util-linux): {e}"))?;
                if output.status.success() {
                    return Ok(way);
                }
                refusals.push(format!(
                    "`unshare {}` refused ({}): {}",
                    way.join(" "),
                    output.status,
                    String::from_utf8_lossy(&output.stderr).trim()
                ));
            }
            Err(refusals.join("; "))
        })
        .clone()
}

/// The child of `parent`, from `/proc` (its `children` file where the kernel has one).
pub fn child_of(parent: u32) -> Option<u32> {
    let children = format!("/proc/{parent}/task/{parent}/children");
    if let Ok(text) = std::fs::read_to_string(children) {
        return text.split_whitespace().next()?.parse().ok();
    }
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(parent) {
            return Some(pid);
        }
    }
    None
}

/// The process's pid in its innermost PID namespace, from `NSpid` in `/proc/<pid>/status`.
pub fn innermost_pid(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
    line.split_whitespace().last()?.parse().ok()
}
