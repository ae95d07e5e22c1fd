//! `nubis`: the operator's command-line tool.
//!
//! Exit codes: 0 success, 2 user error (bad arguments, unreadable or unsafe files), 3 refusal by a
//! peer, 4 internal failure. Every error message says what to do next.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use nubis_protocol::identity::{KeyError, SiteIdentity};
use nubis_protocol::SiteId;

/// Exit code for mistakes the user can fix (arguments, files).
const EXIT_USER: u8 = 2;
/// Exit code for internal failures.
const EXIT_INTERNAL: u8 = 4;

#[derive(Debug, Parser)]
#[command(name = "nubis", version, about = "Federated placement, migration and monitoring of VMs")]
struct Cli {
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Manage a site's identity (signing and sealing keys).
    #[command(subcommand)]
    Keys(KeysCommand),
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Generate the site's signing (ed25519) and sealing (X25519) keys into a 0600 key file and
    /// print the public keys in the form partners paste into their configuration.
    Gen {
        /// The site id (a-z, 0-9, '-', '_').
        #[arg(long)]
        site: String,
        /// Where to write the key file.
        #[arg(long, default_value = "site.key")]
        out: PathBuf,
        /// Replace an existing key file (the old keys are lost; partners must re-pin).
        #[arg(long)]
        force: bool,
    },
    /// Print the public keys of an existing key file.
    Show {
        /// The key file.
        #[arg(long, default_value = "site.key")]
        key: PathBuf,
    },
}

/// A failure with the exit code it maps to.
struct Failure {
    code: u8,
    error: anyhow::Error,
    /// What the user can do about it.
    hint: Option<String>,
}

fn user(error: anyhow::Error) -> Failure {
    Failure {
        code: EXIT_USER,
        error,
        hint: None,
    }
}

fn key_failure(e: KeyError) -> Failure {
    let code = match e {
        KeyError::Io { .. }
        | KeyError::TooOpen { .. }
        | KeyError::Parse { .. }
        | KeyError::Format { .. }
        | KeyError::WeakKey { .. }
        | KeyError::Exists { .. } => EXIT_USER,
    };
    let hint = match &e {
        KeyError::TooOpen { path, .. } => format!("run `chmod 600 {}`", path.display()),
        KeyError::Exists { .. } => "pass --force to replace it, or choose another --out".into(),
        KeyError::Io { .. } => "check the path, or create keys with `nubis keys gen`".into(),
        _ => "regenerate the file with `nubis keys gen`".into(),
    };
    Failure {
        code,
        error: anyhow::Error::new(e),
        hint: Some(hint),
    }
}

fn print_public(identity: &SiteIdentity, json: bool) {
    let public = identity.public();
    if json {
        let v = serde_json::json!({
            "site": public.site.as_str(),
            "signing_key": public.signing_text(),
            "sealing_key": public.sealing_text(),
        });
        println!("{v}");
    } else {
        println!("# Public keys of site {}: give this block to each partner for its site.toml", public.site);
        print!("{}", public.partner_snippet());
    }
}

fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Keys(KeysCommand::Gen { site, out, force }) => {
            let site = SiteId::new(&site)
                .with_context(|| format!("--site {site:?} is not a valid site id"))
                .map_err(|e| Failure {
                    hint: Some("use lower-case letters, digits, '-' and '_', e.g. --site a".into()),
                    ..user(e)
                })?;
            let identity = SiteIdentity::generate(site);
            identity.save(&out, force).map_err(key_failure)?;
            if !cli.json {
                eprintln!("wrote {} (mode 0600)", out.display());
            }
            print_public(&identity, cli.json);
            Ok(())
        }
        Command::Keys(KeysCommand::Show { key }) => {
            let identity = SiteIdentity::load(&key).map_err(key_failure)?;
            print_public(&identity, cli.json);
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure { code, error, hint }) => {
            eprintln!("error: {error:#}");
            if let Some(hint) = hint {
                eprintln!("hint: {hint}");
            }
            let code = if code == 0 { EXIT_INTERNAL } else { code };
            ExitCode::from(code)
        }
    }
}
