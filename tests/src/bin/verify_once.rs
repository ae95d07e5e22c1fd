//! `nubis-verify-once`: verifies one envelope with a persistent replay cache, then exits.
//!
//! The envelope tests run it as a separate process, twice, to prove that a nonce accepted before a
//! restart (orderly, or `--abort-after-accept` to die like `kill -9`) is refused after it.
//!
//! Usage: `nubis-verify-once CACHE_DIR OWN_SITE PARTNER_SITE PARTNER_KEY SUBJECT ENVELOPE_FILE
//! [--abort-after-accept]`. Prints `accepted` or the refusal's error code; exits 0 or 1.

use std::path::Path;
use std::process::ExitCode;

use nubis_protocol::envelope::{now_ms, Verifier, DEFAULT_FRESHNESS_MS};
use nubis_protocol::identity::parse_signing_key;
use nubis_protocol::replay::{Durability, ReplayCache};
use nubis_protocol::SiteId;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 7 {
        eprintln!("usage: nubis-verify-once CACHE_DIR OWN PARTNER PARTNER_KEY SUBJECT FILE [--abort-after-accept]");
        return ExitCode::from(2);
    }
    let run = || -> Result<Result<(), String>, String> {
        let own = SiteId::new(&args[2]).map_err(|e| e.to_string())?;
        let partner = SiteId::new(&args[3]).map_err(|e| e.to_string())?;
        let key = parse_signing_key(&args[4], "partner key").map_err(|e| e.to_string())?;
        let cache = ReplayCache::open(
            Path::new(&args[1]),
            2 * DEFAULT_FRESHNESS_MS,
            Durability::Sync,
        )
        .map_err(|e| e.to_string())?;
        let verifier = Verifier::new(own, [(partner, key)], cache);
        let raw = std::fs::read(&args[6]).map_err(|e| e.to_string())?;
        Ok(verifier
            .open_request(&raw, &args[5], now_ms())
            .map(|_| ())
            .map_err(|e| e.code().to_string()))
    };
    match run() {
        Ok(Ok(())) => {
            println!("accepted");
            if args.get(7).map(String::as_str) == Some("--abort-after-accept") {
                // Die without any orderly shutdown, as under `kill -9`.
                std::process::abort();
            }
            ExitCode::SUCCESS
        }
        Ok(Err(code)) => {
            println!("{code}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
