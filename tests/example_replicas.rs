//! `examples/04_replicas.rs` run as its README says (`cargo run --features postgres --example
//! 04_replicas`), on the test database: it must end with `lost=0`, having handed tasks off,
//! and leave no schema behind.
//!
//! `cargo test --features postgres --test example_replicas`; under `CI=true` a missing
//! database fails it.

#![cfg(all(unix, feature = "postgres"))]

mod common;

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::pg::{database_url, psql};
use rustix::process::{Pid, Signal, kill_process_group};

/// The example's own bound is well under this; past it, the run is killed and the test fails.
const LIMIT: Duration = Duration::from_secs(180);

/// `cargo SUBCOMMAND --quiet --features postgres --example 04_replicas`, from the package,
/// with the other features this test was built with too, so that the library built for the
/// tests serves (`.ci/run` tests with `--all-features`).
fn cargo(subcommand: &str) -> Command {
    let mut features = vec!["postgres"];
    if cfg!(feature = "cli") {
        features.push("cli");
    }
    if cfg!(feature = "metrics") {
        features.push("metrics");
    }
    let mut command = Command::new(option_env!("CARGO").unwrap_or("cargo"));
    command
        .args([subcommand, "--quiet", "--features", &features.join(",")])
        .args(["--example", "04_replicas"])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    command
}

#[test]
fn the_replicas_example_loses_nothing_across_a_rolling_restart() {
    let Some(url) = common::require("a PostgreSQL database", database_url()) else {
        return;
    };
    if common::require(
        "a PostgreSQL server that answers",
        psql(&url, "SELECT 1").map(drop),
    )
    .is_none()
    {
        return;
    }
    let out_path = std::env::temp_dir().join(format!("04_replicas-{}.out", std::process::id()));
    let out = std::fs::File::create(&out_path).expect("an output file");
    let started = Instant::now();
    // Built first (the test's own build does not build examples when run alone), so that the
    // time limit counts the run only.
    let built = cargo("build").status().expect("cargo");
    assert!(built.success(), "building the example failed");
    // In a process group of its own: a run past the limit is killed with its replicas.
    let mut child = cargo("run")
        .process_group(0)
        .env("DATABASE_URL", &url)
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("the output file"))
        .stderr(out)
        .spawn()
        .expect("cargo run");
    let ran = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("the example's status") {
            break status;
        }
        if ran.elapsed() > LIMIT {
            let _ = kill_process_group(Pid::from_child(&child), Signal::KILL);
            let _ = child.wait();
            panic!(
                "the example ran over {LIMIT:?}:\n{}",
                std::fs::read_to_string(&out_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = ran.elapsed();
    let output = std::fs::read_to_string(&out_path).unwrap_or_default();
    let _ = std::fs::remove_file(&out_path);
    assert!(status.success(), "the example failed ({status}):\n{output}");
    let last = output.lines().last().unwrap_or_default();
    let field = |key: &str| -> u64 {
        last.split(' ')
            .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key}= in the last line {last:?}:\n{output}"))
    };
    assert_eq!(field("lost"), 0, "{output}");
    assert_eq!(field("submitted"), field("completed"), "{output}");
    assert!(field("submitted") > 1000, "too little load:\n{output}");
    assert!(
        field("handed_off") > 0,
        "the rolling restart handed nothing off:\n{output}"
    );
    assert!(
        took < Duration::from_secs(60),
        "the example took {took:?}:\n{output}"
    );
    // Its progress: a line at least every few seconds.
    let progress = output.lines().filter(|l| l.contains(" s  ")).count();
    assert!(
        progress as f64 >= took.as_secs_f64() / 3.0,
        "{progress} progress lines in {took:?}:\n{output}"
    );
    let schema = output
        .split("(schema ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .unwrap_or_else(|| panic!("the example names no schema:\n{output}"));
    let left = psql(
        &url,
        &format!("SELECT count(*) FROM pg_namespace WHERE nspname = '{schema}'"),
    )
    .expect("psql");
    assert_eq!(left, "0", "the example's schema {schema} was dropped");
    common::say(&format!(
        "example: {last} ({} ms; built in {} ms)",
        took.as_millis(),
        (ran - started).as_millis()
    ));
}
