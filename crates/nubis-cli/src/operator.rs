//! `nubis operator add`: credentials for one operator of a site — a NATS user named after the
//! operator, with the permissions of its role, to paste into the site server's configuration
//! (`nats-config/leaf.conf`), and a random password written to a file only its owner may read.
//!
//! The permissions are the whole enforcement of the roles: an operator may publish only on
//! `nubis.ops.<site>.<its name>.<endpoint>`, and a `read` operator only for the reading
//! endpoints, so the site's server refuses what the role does not allow and the site daemon
//! reads the caller's name from the subject.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use nubis_protocol::subject::{is_operator_name, OpsEndpoint, Subject};
use nubis_protocol::SiteId;
use rand::distributions::{Alphanumeric, DistString};
use serde::Serialize;

/// Length of generated passwords (alphanumeric).
const PASSWORD_LEN: usize = 32;

/// User names a site's server already gives to its processes and administrator.
const RESERVED: [&str; 5] = ["site", "host", "admin", "sys", "proxy"];

/// The JetStream API an `operate` operator may call in its site's own domain.
const OPERATE_JETSTREAM: [&str; 13] = [
    "$JS.API.INFO",
    "$JS.API.STREAM.NAMES",
    "$JS.API.STREAM.LIST",
    "$JS.API.STREAM.INFO.NUBIS_ACCOUNTING",
    "$JS.API.STREAM.MSG.GET.NUBIS_ACCOUNTING",
    "$JS.API.DIRECT.GET.NUBIS_ACCOUNTING.>",
    "$JS.API.STREAM.INFO.nubis-audit",
    "$JS.API.STREAM.MSG.GET.nubis-audit",
    "$JS.API.STREAM.INFO.OBJ_nubis-image-uploads",
    "$JS.API.STREAM.CREATE.OBJ_nubis-image-uploads",
    "$JS.API.STREAM.MSG.GET.OBJ_nubis-image-uploads",
    "$JS.API.DIRECT.GET.OBJ_nubis-image-uploads.>",
    "$JS.API.STREAM.PURGE.OBJ_nubis-image-uploads",
];

/// The JetStream API a `read` operator may call in its site's own domain.
const READ_JETSTREAM: [&str; 3] = [
    "$JS.API.INFO",
    "$JS.API.STREAM.INFO.nubis-audit",
    "$JS.API.STREAM.MSG.GET.nubis-audit",
];

/// What an operator may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OperatorRole {
    /// Status, sites, VMs, monitoring, usage, the image list, the audit trail, and watching.
    Read,
    /// Everything `read` may, and deploy, migrate, evict, control, cancel and image put.
    Operate,
}

impl OperatorRole {
    /// Whether the role may call `endpoint`.
    pub fn allows(self, endpoint: OpsEndpoint) -> bool {
        self == OperatorRole::Operate || !endpoint.is_mutating()
    }
}

impl std::fmt::Display for OperatorRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OperatorRole::Read => "read",
            OperatorRole::Operate => "operate",
        })
    }
}

/// `nubis operator add`.
#[derive(Debug, Args)]
pub struct AddArgs {
    /// The operator's name, which is its NATS user (a-z, 0-9, '-', '_'; at most 32).
    pub name: String,
    /// The site whose server the operator is added to.
    #[arg(long, env = "NUBIS_SITE")]
    pub site: String,
    /// What the operator may do.
    #[arg(long, value_enum)]
    pub role: OperatorRole,
    /// Where to write the password (mode 0600); default `<name>.nats-password`.
    #[arg(long)]
    pub password_file: Option<PathBuf>,
    /// Replace an existing password file.
    #[arg(long)]
    pub force: bool,
}

/// Why an operator (or a host agent's user) could not be added.
#[derive(Debug)]
pub enum AddError {
    /// The name or site cannot be used.
    Name(String),
    /// The password file could not be written.
    Io(PathBuf, std::io::Error),
}

/// The result of `nubis operator add`.
#[derive(Debug, Serialize)]
pub struct Added {
    /// The NATS user.
    pub user: String,
    /// The role.
    pub role: OperatorRole,
    /// The site.
    pub site: String,
    /// Where the password was written.
    pub password_file: PathBuf,
    /// The user block to paste into the site server's `FED` account users.
    pub block: String,
}

/// Generates the operator's password, writes it and returns the user block.
pub fn add(args: &AddArgs) -> Result<Added, AddError> {
    let site = parse_site(&args.site)?;
    check_name(&args.name)?;
    let (file, password) = new_password(args.password_file.as_deref(), &args.name, args.force)?;
    Ok(Added {
        user: args.name.clone(),
        role: args.role,
        site: site.to_string(),
        password_file: file,
        block: user_block(site.as_str(), &args.name, args.role, &password),
    })
}

/// The site of `--site`, or why it cannot be one.
pub(crate) fn parse_site(site: &str) -> Result<SiteId, AddError> {
    SiteId::new(site)
        .map_err(|e| AddError::Name(format!("--site {site:?} is not a valid site id: {e}")))
}

/// A fresh random password for NATS user `user`, written to `file` (default
/// `<user>.nats-password`, mode 0600; an existing file is replaced only if `force`); returns
/// the file and the password.
pub(crate) fn new_password(
    file: Option<&Path>,
    user: &str,
    force: bool,
) -> Result<(PathBuf, String), AddError> {
    let file = file.map_or_else(
        || PathBuf::from(format!("{user}.nats-password")),
        Path::to_path_buf,
    );
    let password = Alphanumeric.sample_string(&mut rand::thread_rng(), PASSWORD_LEN);
    write_private(&file, &password, force).map_err(|e| AddError::Io(file.clone(), e))?;
    Ok((file, password))
}

fn check_name(name: &str) -> Result<(), AddError> {
    if !is_operator_name(name) {
        return Err(AddError::Name(format!(
            "{name:?} cannot name an operator: use 1 to 32 of a-z, 0-9, '-', '_'"
        )));
    }
    if RESERVED.contains(&name) {
        return Err(AddError::Name(format!(
            "{name:?} is the user of a site process or its administrator"
        )));
    }
    Ok(())
}

/// Writes `password` to a new file of mode 0600 (replacing one only if `force`).
fn write_private(path: &Path, password: &str, force: bool) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).mode(0o600);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let mut file = options.open(path)?;
    writeln!(file, "{password}")?;
    file.sync_all()
}

/// The user block of operator `name` with `role` at `site`, in the form of
/// `nats-config/leaf.conf` (whose `viewer` user is this block for `viewer`, role `read`).
pub fn user_block(site: &str, name: &str, role: OperatorRole, password: &str) -> String {
    let inbox = format!("{}.>", Subject::operator_inbox_prefix(name));
    let mut publish: Vec<String> = vec![inbox.clone()];
    match role {
        OperatorRole::Operate => publish.push(format!("nubis.ops.{site}.{name}.*")),
        OperatorRole::Read => publish.extend(
            OpsEndpoint::ALL
                .into_iter()
                .filter(|e| role.allows(*e))
                .map(|e| format!("nubis.ops.{site}.{name}.{}", e.as_str())),
        ),
    }
    publish.push("$SRV.>".into());
    publish.extend(
        match role {
            // Read the accounting and audit streams, write the image-upload bucket; deleting,
            // changing or purging any other stream is the site administrator's.
            OperatorRole::Operate => &OPERATE_JETSTREAM[..],
            OperatorRole::Read => &READ_JETSTREAM[..],
        }
        .iter()
        .map(|s| s.to_string()),
    );
    publish.extend(
        [
            "$JS.hub.API.INFO",
            "$JS.hub.API.STREAM.INFO.KV_nubis-directory",
            "$JS.hub.API.STREAM.MSG.GET.KV_nubis-directory",
            "$JS.hub.API.DIRECT.GET.KV_nubis-directory.>",
            "$JS.hub.API.CONSUMER.CREATE.KV_nubis-directory.>",
            "$JS.FC.>",
        ]
        .map(String::from),
    );
    if role == OperatorRole::Operate {
        publish.push("$O.nubis-image-uploads.>".into());
    }
    let list = |subjects: &[String]| -> String {
        subjects
            .iter()
            .map(|s| format!("              \"{s}\"\n"))
            .collect()
    };
    let subscribe: Vec<String> = vec![
        inbox,
        "nubis.mon.>".into(),
        format!("nubis.events.{site}.>"),
        format!("nubis.proxy.{site}.*.progress.>"),
    ];
    format!(
        "      {{\n\
         \x20       user: {name}\n\
         \x20       password: \"{password}\"\n\
         \x20       permissions: {{\n\
         \x20         publish: {{\n\
         \x20           allow: [\n{}\
         \x20           ]\n\
         \x20         }}\n\
         \x20         subscribe: {{\n\
         \x20           allow: [\n{}\
         \x20           ]\n\
         \x20         }}\n\
         \x20       }}\n\
         \x20     }}\n",
        list(&publish),
        list(&subscribe),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    use nubis_bus::server_config::LEAF as LEAF_TEMPLATE;

    /// The template's block of `user`, without its comment lines.
    fn template_block(user: &str) -> String {
        let start = LEAF_TEMPLATE
            .find(&format!("        user: {user}\n"))
            .unwrap();
        let head = LEAF_TEMPLATE[..start].rfind("      {\n").unwrap();
        let end = start + LEAF_TEMPLATE[start..].find("\n      }\n").unwrap() + "\n      }\n".len();
        LEAF_TEMPLATE[head..end]
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect()
    }

    #[test]
    fn the_read_block_is_the_templates_viewer() {
        let block = user_block(
            "{{SITE}}",
            "viewer",
            OperatorRole::Read,
            "{{VIEWER_PASSWORD}}",
        );
        assert_eq!(block, template_block("viewer"));
    }

    #[test]
    fn the_operate_block_is_the_templates_operator_without_the_shared_subjects() {
        let block = user_block(
            "{{SITE}}",
            "operator",
            OperatorRole::Operate,
            "{{OPERATOR_PASSWORD}}",
        );
        let shared = "              \"nubis.ops.{{SITE}}.*\"\n";
        assert_eq!(block, template_block("operator").replacen(shared, "", 1));
    }

    #[test]
    fn a_read_operator_may_publish_no_mutating_endpoint() {
        let block = user_block("a", "ann", OperatorRole::Read, "pw");
        for e in OpsEndpoint::ALL {
            let subject = format!("\"nubis.ops.a.ann.{}\"", e.as_str());
            assert_eq!(block.contains(&subject), !e.is_mutating(), "{subject}");
        }
        assert!(!block.contains("nubis.ops.a.ann.*"));
        assert!(!block.contains("$JS.API.>"));
        let operate = user_block("a", "ann", OperatorRole::Operate, "pw");
        assert!(!operate.contains("$JS.API.>"));
        assert!(!operate.contains("STREAM.DELETE"));
        assert!(!operate.contains("PURGE.NUBIS_ACCOUNTING"));
        assert!(!block.contains("nubis.audit"));
    }

    #[test]
    fn names_of_site_processes_and_invalid_names_are_refused() {
        for name in ["site", "admin", "Alice", "a.b", "a*", ""] {
            assert!(check_name(name).is_err(), "{name}");
        }
        assert!(check_name("alice").is_ok());
    }

    #[test]
    fn the_password_goes_to_a_private_file_that_is_not_replaced_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ann.pw");
        let args = AddArgs {
            name: "ann".into(),
            site: "a".into(),
            role: OperatorRole::Operate,
            password_file: Some(file.clone()),
            force: false,
        };
        let added = add(&args).unwrap();
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let password = std::fs::read_to_string(&file).unwrap();
        assert_eq!(password.trim().len(), PASSWORD_LEN);
        assert!(added
            .block
            .contains(&format!("password: \"{}\"", password.trim())));
        assert!(added.block.contains("\"nubis.ops.a.ann.*\""));
        assert!(matches!(add(&args), Err(AddError::Io(..))));
        let again = add(&AddArgs {
            force: true,
            ..args
        })
        .unwrap();
        assert_ne!(again.block, added.block);
    }
}
