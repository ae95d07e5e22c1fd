//! The `nubis` binary as an operator runs it: exit codes (2 user error, 3 refused by a peer,
//! 5 unreachable), messages that say what to do next, and `--json` output that parses.
//!
//! These run the real binary, so they live with the CLI crate (Cargo builds a crate's binaries
//! for its own integration tests only).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};

fn nubis(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nubis"))
        .args(args)
        .env_remove("NUBIS_SITE")
        .env_remove("NUBIS_NATS_URL")
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn keys_gen_writes_a_private_file_and_prints_json() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("a.key");
    let o = nubis(&[
        "--json",
        "keys",
        "gen",
        "--site",
        "a",
        "--out",
        key.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["site"], "a");
    assert!(v["signing_key"].as_str().unwrap().starts_with("ed25519:"));
    assert!(v["sealing_key"].as_str().unwrap().starts_with("x25519:"));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // A second gen refuses to overwrite; a loose file is refused with the fix in the hint.
    let o = nubis(&["keys", "gen", "--site", "a", "--out", key.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--force"), "{}", stderr(&o));
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = nubis(&["keys", "show", "--key", key.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("chmod 600"), "{}", stderr(&o));
}

#[test]
fn argument_errors_are_user_errors() {
    let o = nubis(&[
        "keys",
        "gen",
        "--site",
        "Not.Valid",
        "--out",
        "/nonexistent/x",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("not a valid site id"), "{}", stderr(&o));
    let o = nubis(&["vm", "status"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let o = nubis(&["site"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--config"), "{}", stderr(&o));
}

#[test]
fn a_bad_site_configuration_names_the_problem_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("site.toml");
    std::fs::write(
        &config,
        "site = \"a\"\nkey_file = \"a.key\"\nnats_url = \"nats://127.0.0.1:1\"\ndata_dir = \"d\"\n",
    )
    .unwrap();
    let o = nubis(&["site", "--config", config.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("key_file"), "{}", stderr(&o));

    let key = dir.path().join("a.key");
    assert!(
        nubis(&["keys", "gen", "--site", "a", "--out", key.to_str().unwrap()])
            .status
            .success()
    );
    std::fs::write(
        &config,
        "site = \"a\"\nkey_file = \"a.key\"\nnats_url = \"nats://127.0.0.1:1\"\ndata_dir = \"d\"\n\
         [[partners]]\nsite = \"b\"\nsigning_key = \"rsa:AAAA\"\nsealing_key = \"x25519:AAAA\"\n",
    )
    .unwrap();
    let o = nubis(&["site", "--config", config.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("partners[0].signing_key"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn an_unreachable_site_exits_5_with_a_hint() {
    // Port 1 on loopback: nothing listens there.
    let o = nubis(&[
        "site",
        "status",
        "--site",
        "a",
        "--nats-url",
        "nats://127.0.0.1:1",
        "--timeout",
        "1",
    ]);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    assert!(stderr(&o).contains("hint:"), "{}", stderr(&o));
    let o = nubis(&[
        "vm",
        "list",
        "--site",
        "a",
        "--nats-url",
        "nats://127.0.0.1:1",
        "--timeout",
        "1",
    ]);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
}

#[test]
fn completions_are_printed() {
    let o = nubis(&["completions", "bash"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("nubis"));
}
