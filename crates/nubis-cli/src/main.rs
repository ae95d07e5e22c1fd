//! `nubis`: the operator's command-line tool.
//!
//! Exit codes: 0 success, 2 user error (bad arguments, unreadable or unsafe files, bad
//! configuration), 3 refusal by a peer, 4 internal failure, 5 site unreachable. Every error
//! message says what to do next.

mod audit;
mod directory;
mod federation;
mod host_user;
mod image;
mod monitor;
mod operator;
mod ops_client;
mod output;
mod site;
mod tls;
mod vm;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use nubis_protocol::identity::{KeyError, SiteIdentity};
use nubis_protocol::SiteId;

/// Exit code for mistakes the user can fix (arguments, files).
const EXIT_USER: u8 = 2;
/// Exit code for a refusal by the site or a peer.
const EXIT_REFUSED: u8 = 3;
/// Exit code for internal failures.
const EXIT_INTERNAL: u8 = 4;
/// Exit code when the site cannot be reached.
const EXIT_UNREACHABLE: u8 = 5;

#[derive(Debug, Parser)]
#[command(
    name = "nubis",
    version,
    about = "Federated placement, migration and monitoring of VMs"
)]
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
    /// Run the site daemon (`nubis site --config site.toml`), or ask a site about itself.
    #[command(args_conflicts_with_subcommands = true)]
    Site {
        /// Run the daemon with this configuration file.
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: Option<SiteCommand>,
    },
    /// List the sites a site sees in the federation directory, with trust and liveness.
    Sites {
        #[command(flatten)]
        conn: ops_client::Connection,
    },
    /// Deploy, migrate, evict, control and follow VMs.
    #[command(subcommand)]
    Vm(vm::VmCommand),
    /// Upload and list disk images of the site's image store.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Print a VM's monitoring as it arrives (verified; sealed batches opened with --key).
    Watch(monitor::WatchArgs),
    /// Report a VM's resource usage (CPU-hours, GiB-hours, bytes) from the site's accounting.
    Usage(monitor::UsageArgs),
    /// Show the site's record of mutating operator calls (who, what, when, outcome).
    Audit(audit::AuditArgs),
    /// Manage a site's operators (NATS users with the `read` or `operate` role).
    #[command(subcommand)]
    Operator(OperatorCommand),
    /// Manage a site's host agents' NATS users (one per host, limited to its own subjects).
    #[command(subcommand)]
    HostUser(HostUserCommand),
    /// Create the federation's TLS certificate authority and issue the hub's and the sites'
    /// certificates for the leaf connections.
    #[command(subcommand)]
    Tls(tls::TlsCommand),
    /// Generate a whole deployment (`init`), and create the federation's directory at the hub
    /// (`directory`).
    #[command(subcommand)]
    Federation(federation::FederationCommand),
    /// Run a Transfer proxy (`nubis proxy --config proxy.toml`).
    Proxy {
        /// The proxy's configuration file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Run a host agent (`nubis host --config host.toml`).
    Host {
        /// The host agent's configuration file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Print shell completions for bash, zsh, fish, elvish or powershell.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
enum SiteCommand {
    /// Show a site's status.
    Status {
        #[command(flatten)]
        conn: ops_client::Connection,
    },
}

#[derive(Debug, Subcommand)]
enum OperatorCommand {
    /// Generate an operator's NATS user: a random password into a 0600 file, and the user
    /// block (with the role's permissions) to paste into the site server's configuration.
    Add(operator::AddArgs),
}

#[derive(Debug, Subcommand)]
enum HostUserCommand {
    /// Generate a host agent's NATS user `host.<id>`: a random password into a 0600 file, and
    /// the user block (that host's subjects only) to paste into the site server's configuration.
    Add(host_user::AddArgs),
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

/// Prints what `operator add` or `host-user add` made: `added` as JSON, or where the password
/// went (stderr) and `block` under a header naming `what` (stdout).
fn print_user(
    json: bool,
    added: &impl serde::Serialize,
    user: &str,
    password_file: &std::path::Path,
    what: &str,
    block: &str,
) {
    if json {
        println!("{}", serde_json::json!(added));
        return;
    }
    eprintln!(
        "wrote the password of {user} to {} (mode 0600)",
        password_file.display()
    );
    println!(
        "# {what}: paste into the `users` list of the FED account\n# of the site's nats-server configuration, then reload it (`nats-server --signal reload`)."
    );
    print!("{block}");
}

/// The failure of `operator add` or `host-user add`, with `name_hint` for a refused name.
fn add_failure(e: operator::AddError, name_hint: &str) -> Failure {
    match e {
        operator::AddError::Name(m) => Failure {
            hint: Some(name_hint.into()),
            ..user(anyhow::anyhow!(m))
        },
        operator::AddError::Io(path, e) => Failure {
            hint: Some("choose another --password-file, or pass --force to replace it".into()),
            ..user(anyhow::Error::new(e).context(format!("cannot write {}", path.display())))
        },
    }
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
        println!(
            "# Public keys of site {}: give this block to each partner for its site.toml",
            public.site
        );
        print!("{}", public.partner_snippet());
    }
}

fn ops_failure(e: ops_client::OpsFailure) -> Failure {
    use ops_client::OpsFailure as F;
    let (code, msg, hint) = match e {
        F::User(m) => (EXIT_USER, m, "check the arguments (see --help)".to_string()),
        F::Unreachable(m) => (
            EXIT_UNREACHABLE,
            m,
            "check that the site daemon runs and --nats-url/--site (or NUBIS_NATS_URL/NUBIS_SITE) point at it"
                .to_string(),
        ),
        F::Refused { code, message } => (
            EXIT_REFUSED,
            format!("the site refused the request ({code}): {message}"),
            "read the site's message above; `nubis site status` shows its state".to_string(),
        ),
        F::Forbidden { subject, server } => (
            EXIT_REFUSED,
            format!("the site's server refused to carry the request on {subject}: this NATS user may not publish there (server: {server})"),
            "the operator's role does not allow this endpoint; ask the site administrator for an operator with the `operate` role (`nubis operator add NAME --role operate`)".to_string(),
        ),
        F::Internal(m) => (EXIT_INTERNAL, m, "this is a bug; please report it with the output above".to_string()),
    };
    Failure {
        code,
        error: anyhow::anyhow!(msg),
        hint: Some(hint),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure {
            code: EXIT_INTERNAL,
            error: anyhow::Error::new(e).context("cannot start the async runtime"),
            hint: None,
        })
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Cancels `token` on SIGINT or SIGTERM.
async fn cancel_on_signal(token: tokio_util::sync::CancellationToken) {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
    token.cancel();
}

fn run_site_daemon(config: &std::path::Path) -> Result<(), Failure> {
    let config = nubis_site::config::SiteConfig::load(config).map_err(|e| Failure {
        code: EXIT_USER,
        error: anyhow::Error::new(e),
        hint: Some("fix the configuration file (see deploy/ for examples)".into()),
    })?;
    init_tracing();
    let rt = runtime()?;
    rt.block_on(async {
        let token = tokio_util::sync::CancellationToken::new();
        tokio::spawn(cancel_on_signal(token.clone()));
        nubis_site::run(config, token).await
    })
    .map_err(|e| {
        let code = match e {
            nubis_site::SiteError::Connect { .. } => EXIT_UNREACHABLE,
            nubis_site::SiteError::NatsServerTooOld { .. } => EXIT_USER,
            _ => EXIT_INTERNAL,
        };
        Failure {
            code,
            error: anyhow::Error::new(e),
            hint: Some("see the log above; the daemon stopped".into()),
        }
    })
}

fn run_daemon<F, E>(
    what: &str,
    fut: impl FnOnce(tokio_util::sync::CancellationToken) -> F,
) -> Result<(), Failure>
where
    F: std::future::Future<Output = Result<(), E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    init_tracing();
    let rt = runtime()?;
    rt.block_on(async {
        let token = tokio_util::sync::CancellationToken::new();
        tokio::spawn(cancel_on_signal(token.clone()));
        fut(token).await
    })
    .map_err(|e| Failure {
        code: EXIT_INTERNAL,
        error: anyhow::Error::new(e),
        hint: Some(format!("see the log above; the {what} stopped")),
    })
}

fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Vm(cmd) => {
            runtime()?
                .block_on(vm::run(cmd, cli.json))
                .map_err(ops_failure)?
                .print(cli.json);
            Ok(())
        }
        Command::Image(cmd) => {
            runtime()?
                .block_on(image::run(cmd, cli.json))
                .map_err(ops_failure)?
                .print(cli.json);
            Ok(())
        }
        Command::Watch(args) => {
            let v = runtime()?
                .block_on(monitor::watch(args, cli.json))
                .map_err(ops_failure)?;
            if !cli.json {
                eprintln!("{} batches shown, {} dropped", v["batches"], v["dropped"]);
            }
            Ok(())
        }
        Command::Usage(args) => {
            runtime()?
                .block_on(monitor::usage(args))
                .map_err(ops_failure)?
                .print(cli.json);
            Ok(())
        }
        Command::Audit(args) => {
            runtime()?
                .block_on(audit::run(args))
                .map_err(ops_failure)?
                .print(cli.json);
            Ok(())
        }
        Command::Operator(OperatorCommand::Add(args)) => {
            let added = operator::add(&args).map_err(|e| {
                add_failure(e, "use lower-case letters, digits, '-' and '_', e.g. alice")
            })?;
            let what = format!(
                "Operator {} of site {}, role {}",
                added.user, added.site, added.role
            );
            print_user(
                cli.json,
                &added,
                &added.user,
                &added.password_file,
                &what,
                &added.block,
            );
            Ok(())
        }
        Command::HostUser(HostUserCommand::Add(args)) => {
            let added = host_user::add(&args)
                .map_err(|e| add_failure(e, "use letters, digits, '-' and '_', e.g. h1"))?;
            let what = format!("Host agent user {} of site {}", added.user, added.site);
            let block = format!(
                "# In the agent's host.toml: nats_user = \"{}\", nats_password_file = \"{}\"\n{}",
                added.user,
                added.password_file.display(),
                added.block
            );
            print_user(
                cli.json,
                &added,
                &added.user,
                &added.password_file,
                &what,
                &block,
            );
            Ok(())
        }
        Command::Tls(cmd) => {
            let written = match &cmd {
                tls::TlsCommand::Ca(args) => tls::ca(args),
                tls::TlsCommand::Issue(args) => tls::issue(args),
            }
            .map_err(|e| Failure {
                hint: Some(tls_hint(&e)),
                ..user(e)
            })?;
            written.print(cli.json);
            Ok(())
        }
        Command::Federation(federation::FederationCommand::Init(args)) => {
            let generated = federation::init(&args).map_err(|e| Failure {
                hint: Some(
                    "choose an empty --out; check the --hub, --site and --host values".into(),
                ),
                ..user(e)
            })?;
            generated.print(cli.json);
            Ok(())
        }
        Command::Federation(federation::FederationCommand::Directory(args)) => {
            init_tracing();
            let created = runtime()?
                .block_on(directory::create(&args))
                .map_err(|e| Failure {
                    code: EXIT_UNREACHABLE,
                    error: e,
                    hint: Some(
                        "check that the hub's nodes run and --nats-url, --password-file point at one; a clustered hub needs a majority of its nodes up".into(),
                    ),
                })?;
            if cli.json {
                println!("{}", serde_json::json!(created));
            } else {
                println!(
                    "directory {} ready: {} replica(s) on {}",
                    created.stream,
                    created.replicas,
                    created.placed_on.join(", ")
                );
            }
            Ok(())
        }
        Command::Proxy { config } => {
            let config = nubis_proxy::config::Config::load(&config).map_err(|e| Failure {
                code: EXIT_USER,
                error: anyhow::Error::new(e),
                hint: Some("fix the proxy configuration file".into()),
            })?;
            // Before the runtime's threads allocate: see nubis_proxy::memory.
            nubis_proxy::memory::bound_chunk_retention();
            run_daemon("proxy", move |token| nubis_proxy::run(config, token))
        }
        Command::Host { config } => {
            let config = nubis_host::config::HostConfig::load(&config).map_err(|e| Failure {
                code: EXIT_USER,
                error: anyhow::Error::new(e),
                hint: Some("fix the host agent configuration file".into()),
            })?;
            run_daemon("host agent", move |token| {
                nubis_host::agent::run(config, token)
            })
        }
        Command::Completions { shell } => {
            use clap::CommandFactory as _;
            clap_complete::generate(shell, &mut Cli::command(), "nubis", &mut std::io::stdout());
            Ok(())
        }
        Command::Site {
            config: Some(config),
            ..
        } => run_site_daemon(&config),
        Command::Site {
            config: None,
            command: None,
        } => Err(user(anyhow::anyhow!(
            "`nubis site` needs --config FILE to run the daemon, or a subcommand such as `status`"
        ))),
        Command::Site {
            command: Some(SiteCommand::Status { conn }),
            ..
        } => {
            runtime()?
                .block_on(site::status(&conn))
                .map_err(ops_failure)?
                .print(cli.json);
            Ok(())
        }
        Command::Sites { conn } => {
            runtime()?
                .block_on(site::sites(&conn))
                .map_err(ops_failure)?
                .print(cli.json);
            Ok(())
        }
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

/// What to do about a failed `nubis tls` command.
fn tls_hint(e: &anyhow::Error) -> String {
    use nubis_bus::tls::TlsError;
    match e.downcast_ref::<TlsError>() {
        Some(TlsError::Exists { .. }) => {
            "choose another --out, or remove the old files first".into()
        }
        Some(TlsError::LooseKey { path, .. }) => format!("run `chmod 600 {}`", path.display()),
        Some(TlsError::InvalidName { .. }) => {
            "a site's certificate names its site id; the hub's needs --server-name HOST".into()
        }
        Some(TlsError::Io { .. } | TlsError::Parse { .. } | TlsError::KeyMismatch { .. }) => {
            "pass the folder `nubis tls ca --out` wrote as --ca".into()
        }
        _ => "check the arguments (see nubis tls --help)".into(),
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
