//! The host agent's configuration (`host.toml`): which site and host it is, where the bus and
//! the hypervisor are, where VM files live and what capacity it offers. Loaded once, validated
//! at start, with errors that name the file and the key.
//!
//! ```toml
//! site = "site-a"                       # the site this host belongs to
//! host = "h1"                           # the host id, unique within the site
//! nats_url = "nats://127.0.0.1:4222"    # the site's own nats-server
//! # nats_user = "host-h1"               # optional, with nats_password
//! # nats_password = "…"                 # or nats_password_file = "nats.pw" (mode 600)
//! libvirt_uri = "qemu:///system"        # or "test:///default"
//! accelerator = "tcg"                   # "tcg" (default) or "kvm"
//! vm_root = "/var/lib/nubis/vms"        # default; relative paths resolve against this file
//! shutdown_timeout_ms = 30000           # graceful guest shutdown before it is destroyed
//! grace_period_ms = 30000               # requests in flight may finish when the agent stops
//! capacity_report_interval_ms = 5000    # how often the capacity report is published
//! monitor_tick_ms = 250                 # how often the monitoring Producer measures and sends
//! monitor_outbox = 10000                # batches kept until the site acknowledges them
//! kpi_root = "/var/lib/nubis/vms-kpi"   # KPI filesystems; default: `<vm_root>-kpi` beside vm_root
//! kpi_share = false                     # share each VM's KPI filesystem with its guest (virtio-9p,
//!                                       # tag `nubis-kpi`); default false
//!
//! [capacity]                            # optional overrides; default from libvirt and the
//! vcpus = 8                             # file system of `vm_root`
//! memory_mib = 16384
//! disk_bytes = 500_000_000_000
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use nubis_protocol::message::HostId;
use nubis_protocol::SiteId;
use serde::Deserialize;

use crate::domain_xml::Accelerator;

/// Default directory under which each VM gets its own directory.
pub const DEFAULT_VM_ROOT: &str = "/var/lib/nubis/vms";

/// Default of `monitor_tick_ms`.
pub const DEFAULT_MONITOR_TICK_MS: u64 = 250;

/// Default of `monitor_outbox`.
pub const DEFAULT_MONITOR_OUTBOX: usize = 10_000;

use nubis_bus::config::Secret;
pub use nubis_bus::config::{ConfigError, Credentials, Login};

/// Capacity figures that replace what the agent would measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapacityOverrides {
    /// Virtual CPUs offered.
    pub vcpus: Option<u32>,
    /// Memory offered, in MiB.
    pub memory_mib: Option<u64>,
    /// Disk space offered, in bytes.
    pub disk_bytes: Option<u64>,
}

/// The validated configuration of one host agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostConfig {
    /// The site.
    pub site: SiteId,
    /// This host.
    pub host: HostId,
    /// How to reach the site's nats-server.
    pub nats: Credentials,
    /// The libvirt connection URI.
    pub libvirt_uri: String,
    /// Software emulation or KVM.
    pub accelerator: Accelerator,
    /// The directory holding one directory per VM.
    pub vm_root: PathBuf,
    /// How long a guest may take to power off before it is destroyed.
    pub shutdown_timeout: Duration,
    /// How long requests in flight may take to finish when the agent stops.
    pub grace_period: Duration,
    /// How often the capacity report is published.
    pub capacity_report_interval: Duration,
    /// Capacity figures given by the operator.
    pub capacity: CapacityOverrides,
    /// How often the monitoring Producer measures, polls and sends.
    pub monitor_tick: Duration,
    /// Most monitoring batches kept while the site has not acknowledged them.
    pub monitor_outbox: usize,
    /// The directory of the VMs' KPI filesystems: `<kpi_root>/<vm>` is the mount,
    /// `<kpi_root>/<vm>.sqlite` its database. By default the sibling `<vm_root>-kpi` of the VM
    /// root, so that two agents whose VM roots share a parent never share KPI mounts, and never
    /// inside the VM root, where it would be taken for a VM directory.
    pub kpi_root: PathBuf,
    /// Whether every domain shares its VM's KPI filesystem with the guest (virtio-9p). All hosts
    /// a VM may move between must agree, because a saved state restores only into a domain with
    /// the same devices. Off by default: QEMU cannot save a guest while it holds the share
    /// mounted, so an operator turns it on where the guests' KPI writers mount the share only
    /// to write (see `ARCHITECTURE.md`, "KPI share").
    pub kpi_share: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    site: String,
    host: String,
    nats_url: String,
    nats_user: Option<String>,
    nats_password: Option<Secret>,
    nats_password_file: Option<PathBuf>,
    nats_tls_ca: Option<PathBuf>,
    nats_tls_cert: Option<PathBuf>,
    nats_tls_key: Option<PathBuf>,
    libvirt_uri: String,
    #[serde(default)]
    accelerator: Option<String>,
    #[serde(default)]
    vm_root: Option<PathBuf>,
    #[serde(default = "default_shutdown_timeout_ms")]
    shutdown_timeout_ms: u64,
    #[serde(default = "default_grace_period_ms")]
    grace_period_ms: u64,
    #[serde(default = "default_report_interval_ms")]
    capacity_report_interval_ms: u64,
    #[serde(default)]
    capacity: CapacityOverrides,
    #[serde(default = "default_monitor_tick_ms")]
    monitor_tick_ms: u64,
    #[serde(default = "default_monitor_outbox")]
    monitor_outbox: usize,
    #[serde(default)]
    kpi_root: Option<PathBuf>,
    #[serde(default)]
    kpi_share: Option<bool>,
}

fn default_monitor_tick_ms() -> u64 {
    DEFAULT_MONITOR_TICK_MS
}

fn default_monitor_outbox() -> usize {
    DEFAULT_MONITOR_OUTBOX
}

fn default_shutdown_timeout_ms() -> u64 {
    30_000
}

fn default_grace_period_ms() -> u64 {
    30_000
}

fn default_report_interval_ms() -> u64 {
    5_000
}

impl HostConfig {
    /// Reads and validates the configuration file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = nubis_bus::config::read(path)?;
        Self::parse(&text, path)
    }

    /// Validates configuration `text` read from `path` (relative paths resolve against its
    /// folder).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let invalid = |key: &'static str, reason: String| ConfigError::invalid(path, key, reason);
        let raw: RawConfig = nubis_bus::config::parse_toml(text, path)?;
        let site = SiteId::new(raw.site).map_err(|e| invalid("site", e.to_string()))?;
        let host = HostId::new(raw.host).map_err(|e| invalid("host", e.to_string()))?;
        let nats = Credentials::from_keys(
            path,
            raw.nats_url,
            raw.nats_user,
            raw.nats_password,
            raw.nats_password_file,
        )?
        .with_tls(
            path,
            nubis_bus::config::TlsKeys {
                nats_tls_ca: raw.nats_tls_ca,
                nats_tls_cert: raw.nats_tls_cert,
                nats_tls_key: raw.nats_tls_key,
            },
        )?;
        if raw.libvirt_uri.is_empty() || !raw.libvirt_uri.contains("://") {
            return Err(invalid(
                "libvirt_uri",
                "must be a libvirt URI such as qemu:///system or test:///default".into(),
            ));
        }
        let accelerator = match raw.accelerator.as_deref() {
            None | Some("tcg") => Accelerator::Tcg,
            Some("kvm") => Accelerator::Kvm,
            Some(other) => {
                return Err(invalid(
                    "accelerator",
                    format!("must be \"tcg\" or \"kvm\", not {other:?}"),
                ))
            }
        };
        let vm_root = raw
            .vm_root
            .unwrap_or_else(|| PathBuf::from(DEFAULT_VM_ROOT));
        let resolve = |p: PathBuf| {
            if p.is_absolute() {
                p
            } else {
                path.parent().unwrap_or(Path::new(".")).join(p)
            }
        };
        let usable = |p: &Path| p.to_str().is_some_and(|s| !s.chars().any(char::is_control));
        let vm_root = resolve(vm_root);
        if !usable(&vm_root) {
            return Err(invalid(
                "vm_root",
                "must be a UTF-8 path without control characters".into(),
            ));
        }
        let kpi_root = match raw.kpi_root {
            Some(p) => resolve(p),
            None => {
                let mut name = vm_root.file_name().unwrap_or_default().to_os_string();
                name.push("-kpi");
                vm_root.with_file_name(name)
            }
        };
        if !usable(&kpi_root) {
            return Err(invalid(
                "kpi_root",
                "must be a UTF-8 path without control characters".into(),
            ));
        }
        if kpi_root.starts_with(&vm_root) || vm_root.starts_with(&kpi_root) {
            return Err(invalid(
                "kpi_root",
                "must be outside vm_root (and not contain it)".into(),
            ));
        }
        if raw.monitor_tick_ms == 0 || raw.monitor_tick_ms > 60_000 {
            return Err(invalid(
                "monitor_tick_ms",
                "must be between 1 and 60000".into(),
            ));
        }
        if raw.monitor_outbox == 0 {
            return Err(invalid(
                "monitor_outbox",
                "must be greater than zero".into(),
            ));
        }
        if raw.capacity_report_interval_ms == 0 {
            return Err(invalid(
                "capacity_report_interval_ms",
                "must be greater than zero".into(),
            ));
        }
        if raw.capacity.vcpus == Some(0) {
            return Err(invalid(
                "capacity.vcpus",
                "must be greater than zero".into(),
            ));
        }
        if raw.capacity.memory_mib == Some(0) {
            return Err(invalid(
                "capacity.memory_mib",
                "must be greater than zero".into(),
            ));
        }
        Ok(Self {
            kpi_share: raw.kpi_share.unwrap_or(false),
            site,
            host,
            nats,
            libvirt_uri: raw.libvirt_uri,
            accelerator,
            vm_root,
            shutdown_timeout: Duration::from_millis(raw.shutdown_timeout_ms),
            grace_period: Duration::from_millis(raw.grace_period_ms),
            capacity_report_interval: Duration::from_millis(raw.capacity_report_interval_ms),
            capacity: raw.capacity,
            monitor_tick: Duration::from_millis(raw.monitor_tick_ms),
            monitor_outbox: raw.monitor_outbox,
            kpi_root,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
site = "a"
host = "h1"
nats_url = "nats://127.0.0.1:4222"
libvirt_uri = "test:///default"
vm_root = "vms"
"#;

    fn parse(text: &str) -> Result<HostConfig, ConfigError> {
        HostConfig::parse(text, Path::new("/etc/nubis/host.toml"))
    }

    #[test]
    fn a_good_config_loads_with_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.site.as_str(), "a");
        assert_eq!(c.host.as_str(), "h1");
        assert_eq!(c.accelerator, Accelerator::Tcg);
        assert_eq!(c.vm_root, PathBuf::from("/etc/nubis/vms"));
        assert_eq!(c.shutdown_timeout, Duration::from_secs(30));
        assert_eq!(c.capacity, CapacityOverrides::default());
        assert_eq!(c.nats.login, None);
        let c = parse(&GOOD.replace("vm_root = \"vms\"\n", "")).unwrap();
        assert_eq!(c.vm_root, PathBuf::from(DEFAULT_VM_ROOT));
    }

    #[test]
    fn overrides_and_credentials_are_read() {
        let text = format!(
            "{GOOD}accelerator = \"kvm\"\nnats_user = \"u\"\nnats_password = \"p\"\n\
             [capacity]\nvcpus = 4\nmemory_mib = 2048\n"
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.accelerator, Accelerator::Kvm);
        assert_eq!(c.capacity.vcpus, Some(4));
        assert_eq!(c.capacity.memory_mib, Some(2048));
        assert_eq!(c.capacity.disk_bytes, None);
        let creds = c.nats.login.unwrap();
        assert_eq!(creds.user, "u");
        assert!(
            !format!("{creds:?}").contains("\"p\""),
            "the password is not logged"
        );
    }

    #[test]
    fn the_nats_password_can_come_from_a_private_file() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("nats.pw");
        std::fs::write(&pw, "s3cret").unwrap();
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o400)).unwrap();
        let text = format!("{GOOD}nats_user = \"u\"\nnats_password_file = \"nats.pw\"\n");
        let path = dir.path().join("host.toml");
        let c = HostConfig::parse(&text, &path).unwrap();
        assert_eq!(c.nats.login.as_ref().unwrap().password, "s3cret");
        assert!(!format!("{c:?}").contains("s3cret"));
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o604)).unwrap();
        let err = HostConfig::parse(&text, &path).unwrap_err();
        assert_eq!(err.key(), Some("nats_password_file"), "{err}");
    }

    fn invalid_key(text: &str) -> String {
        match parse(text) {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_values_name_their_key() {
        assert_eq!(invalid_key(&GOOD.replace("\"a\"", "\"A\"")), "site");
        assert_eq!(invalid_key(&GOOD.replace("\"h1\"", "\"h.1\"")), "host");
        assert_eq!(invalid_key(&GOOD.replace("nats://", "http://")), "nats_url");
        assert_eq!(
            invalid_key(&GOOD.replace("test:///default", "default")),
            "libvirt_uri"
        );
        assert_eq!(
            invalid_key(&format!("{GOOD}accelerator = \"xen\"\n")),
            "accelerator"
        );
        assert_eq!(
            invalid_key(&format!("{GOOD}nats_user = \"u\"\n")),
            "nats_password"
        );
        assert_eq!(
            invalid_key(&format!("{GOOD}[capacity]\nvcpus = 0\n")),
            "capacity.vcpus"
        );
    }

    #[test]
    fn monitoring_keys_have_defaults_and_are_read() {
        let c = parse(GOOD).unwrap();
        assert_eq!(
            c.monitor_tick,
            Duration::from_millis(DEFAULT_MONITOR_TICK_MS)
        );
        assert_eq!(c.monitor_outbox, DEFAULT_MONITOR_OUTBOX);
        assert_eq!(c.kpi_root, PathBuf::from("/etc/nubis/vms-kpi"));
        let c = parse(&GOOD.replace("vm_root = \"vms\"\n", "")).unwrap();
        assert_eq!(c.kpi_root, PathBuf::from("/var/lib/nubis/vms-kpi"));
        let c = parse(&format!(
            "{GOOD}monitor_tick_ms = 100\nmonitor_outbox = 5\nkpi_root = \"/srv/kpi\"\n"
        ))
        .unwrap();
        assert_eq!(c.monitor_tick, Duration::from_millis(100));
        assert_eq!(c.monitor_outbox, 5);
        assert_eq!(c.kpi_root, PathBuf::from("/srv/kpi"));
        let c = parse(&format!("{GOOD}kpi_root = \"kpi\"\n")).unwrap();
        assert_eq!(c.kpi_root, PathBuf::from("/etc/nubis/kpi"));
    }

    #[test]
    fn the_kpi_share_is_opt_in() {
        assert!(!parse(GOOD).unwrap().kpi_share);
        assert!(
            parse(&format!("{GOOD}kpi_share = true\n"))
                .unwrap()
                .kpi_share
        );
        assert!(
            !parse(&format!("{GOOD}kpi_share = false\n"))
                .unwrap()
                .kpi_share
        );
    }

    #[test]
    fn bad_monitoring_values_name_their_key() {
        assert_eq!(
            invalid_key(&format!("{GOOD}monitor_tick_ms = 0\n")),
            "monitor_tick_ms"
        );
        assert_eq!(
            invalid_key(&format!("{GOOD}monitor_tick_ms = 3600000\n")),
            "monitor_tick_ms"
        );
        assert_eq!(
            invalid_key(&format!("{GOOD}monitor_outbox = 0\n")),
            "monitor_outbox"
        );
        assert_eq!(
            invalid_key(&format!("{GOOD}kpi_root = \"vms/kpi\"\n")),
            "kpi_root"
        );
        assert_eq!(
            invalid_key(&format!("{GOOD}kpi_root = \"/etc\"\n")),
            "kpi_root"
        );
        assert_eq!(
            invalid_key(&format!("{GOOD}kpi_root = \"/tmp/a\\u0007b\"\n")),
            "kpi_root"
        );
        assert!(matches!(
            parse(&format!("{GOOD}monitor_outbox = -1\n")),
            Err(ConfigError::Parse { message, .. }) if message.contains("monitor_outbox")
        ));
    }

    #[test]
    fn missing_and_unknown_keys_are_named() {
        let err = parse(&GOOD.replace("host = \"h1\"\n", "")).unwrap_err();
        assert!(matches!(&err, ConfigError::Parse { message, .. } if message.contains("host")));
        let err = parse(&format!("{GOOD}colour = \"blue\"\n")).unwrap_err();
        assert!(matches!(&err, ConfigError::Parse { message, .. } if message.contains("colour")));
    }
}
