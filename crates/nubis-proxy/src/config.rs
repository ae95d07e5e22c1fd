//! Configuration of a Transfer proxy, loaded once from TOML and validated at start.
//!
//! ```toml
//! site = "site-a"
//! proxy = "p1"
//! nats_url = "nats://127.0.0.1:4222"
//! # nats_user = "site"                  # optional, with nats_password, or with
//! # nats_password_file = "nats.pw"      # a file only its owner may read (mode 600)
//! identity_file = "/etc/nubis/site-a.key"
//! store_dir = "/var/lib/nubis/proxy-p1"
//!
//! [[partners]]
//! site = "site-b"
//! signing_key = "ed25519:…"
//!
//! [transfer]
//! # The only directories whose files this proxy serves and receives into: the VM roots of
//! # the site's hosts and the site's image store. Required.
//! roots = ["/var/lib/nubis/site-a/vms", "/var/lib/nubis/site-a/images"]
//! relay_allowed = false
//! bucket_max_bytes = 8589934592
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use nubis_protocol::message::ProxyId;
use nubis_protocol::SiteId;
use serde::Deserialize;

use nubis_bus::config::Secret;
pub use nubis_bus::config::{ConfigError, Credentials};

/// A transfer setting out of range (the key and why).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{key}` {reason}")]
pub struct InvalidSetting {
    /// The key, e.g. `transfer.chunk_size`.
    pub key: &'static str,
    /// Why.
    pub reason: &'static str,
}

/// A pinned partner key (the bilateral contract).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartnerConfig {
    /// The partner site.
    pub site: SiteId,
    /// Its Ed25519 public key, `ed25519:<base64>`.
    pub signing_key: String,
}

/// The whole proxy configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The site this proxy belongs to (also its JetStream domain).
    pub site: SiteId,
    /// This proxy's id within the site.
    pub proxy: ProxyId,
    /// How to reach the site's nats-server (`nats_url`, `nats_user`, `nats_password`).
    pub nats: Credentials,
    /// The site's identity (signs everything the proxy sends).
    pub identity_file: PathBuf,
    /// Directory of the token store and replay cache.
    pub store_dir: PathBuf,
    /// Partners whose proxies may ask this one.
    pub partners: Vec<PartnerConfig>,
    /// Transfer tuning and policy.
    pub transfer: TransferSettings,
}

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    site: SiteId,
    proxy: ProxyId,
    nats_url: String,
    #[serde(default)]
    nats_user: Option<String>,
    #[serde(default)]
    nats_password: Option<Secret>,
    #[serde(default)]
    nats_password_file: Option<PathBuf>,
    #[serde(default)]
    nats_tls_ca: Option<PathBuf>,
    #[serde(default)]
    nats_tls_cert: Option<PathBuf>,
    #[serde(default)]
    nats_tls_key: Option<PathBuf>,
    identity_file: PathBuf,
    store_dir: PathBuf,
    #[serde(default)]
    partners: Vec<PartnerConfig>,
    #[serde(default)]
    transfer: TransferSettings,
}

/// Tuning and policy of transfers.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransferSettings {
    /// The directories this proxy may read served files from and write received files into:
    /// the VM roots of its site's hosts (`vm_root` in each `host.toml`) and the site's image
    /// store. A mint request naming a file or directory anywhere else (after symbolic links
    /// are resolved) is refused, whoever asks. Absolute; at least one.
    pub roots: Vec<PathBuf>,
    /// Bytes per object chunk (at most the servers' `max_payload` minus headers).
    pub chunk_size: usize,
    /// Chunks published but not yet acknowledged, per file.
    pub publish_window: usize,
    /// Chunks a fetching (or relaying) proxy asks the source bucket for at a time, at least:
    /// with `chunk_size` it bounds the bytes in flight towards this proxy, hence its memory.
    /// Over a long link the window follows the bandwidth-delay product instead (see
    /// [`TransferSettings::fetch_window_for`]), up to `max_fetch_window`.
    pub fetch_window: usize,
    /// The most chunks a fetching proxy asks for at a time, however long the link.
    pub max_fetch_window: usize,
    /// The bandwidth the fetch window is sized to fill, in bytes per second (default
    /// 125,000,000: 1 Gbit/s): with the round trip to the source it gives the bytes that must
    /// be in flight.
    pub link_bytes_per_sec: u64,
    /// A fetching proxy makes what it received durable, and records how far it got, every
    /// this many bytes; after a restart it resumes the file from the last such point.
    pub checkpoint_bytes: u64,
    /// Size limit of the site's transfer bucket (used when this proxy creates it): the sum of
    /// the VM files being served at once must fit (default 8 GiB; the site server's
    /// `max_file_store` must allow it).
    pub bucket_max_bytes: i64,
    /// Token lifetime when the mint request names none.
    pub default_ttl_ms: u64,
    /// Longest token lifetime granted.
    pub max_ttl_ms: u64,
    /// Site policy: may this proxy relay transfers for its site (paper III-D)?
    pub relay_allowed: bool,
    /// A fetch fails when no data arrives for this long.
    pub stall_timeout_ms: u64,
    /// Interval of progress events.
    pub progress_interval_ms: u64,
    /// Interval of expired-token collection.
    pub gc_interval_ms: u64,
    /// How long an expired token stays refused as expired before it is forgotten.
    pub tombstone_ms: u64,
    /// Requests handled at once.
    pub max_concurrent_requests: usize,
    /// Site policy: the most bytes per second any one fetch (or relay) of this proxy reads
    /// from another site; a migration's own cap applies when it is smaller. Absent: no cap.
    pub max_bytes_per_sec: Option<u64>,
}

impl Default for TransferSettings {
    fn default() -> Self {
        Self {
            roots: Vec::new(),
            chunk_size: 1 << 20,
            publish_window: 32,
            fetch_window: 8,
            max_fetch_window: 64,
            link_bytes_per_sec: 125_000_000,
            checkpoint_bytes: 64 << 20,
            bucket_max_bytes: 8 << 30,
            default_ttl_ms: 3_600_000,
            max_ttl_ms: 86_400_000,
            relay_allowed: false,
            stall_timeout_ms: 60_000,
            progress_interval_ms: 500,
            gc_interval_ms: 10_000,
            tombstone_ms: 86_400_000,
            max_concurrent_requests: 64,
            max_bytes_per_sec: None,
        }
    }
}

impl TransferSettings {
    /// Checks ranges; the errors name the key.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if self.roots.is_empty() {
            return Err(InvalidSetting {
                key: "transfer.roots",
                reason: "must name the VM roots of the site's hosts and its image store",
            });
        }
        if self.roots.iter().any(|r| !r.is_absolute()) {
            return Err(InvalidSetting {
                key: "transfer.roots",
                reason: "must be absolute paths",
            });
        }
        if !(4096..=(7 << 20)).contains(&self.chunk_size) {
            return Err(InvalidSetting {
                key: "transfer.chunk_size",
                reason: "must be between 4 KiB and 7 MiB (below max_payload)",
            });
        }
        if self.publish_window == 0 {
            return Err(InvalidSetting {
                key: "transfer.publish_window",
                reason: "must be at least 1",
            });
        }
        if self.fetch_window == 0 {
            return Err(InvalidSetting {
                key: "transfer.fetch_window",
                reason: "must be at least 1",
            });
        }
        if self.max_fetch_window < self.fetch_window {
            return Err(InvalidSetting {
                key: "transfer.max_fetch_window",
                reason: "must be at least fetch_window",
            });
        }
        if self.link_bytes_per_sec == 0 {
            return Err(InvalidSetting {
                key: "transfer.link_bytes_per_sec",
                reason: "must be positive",
            });
        }
        if self.checkpoint_bytes == 0 {
            return Err(InvalidSetting {
                key: "transfer.checkpoint_bytes",
                reason: "must be positive",
            });
        }
        if self.bucket_max_bytes <= 0 {
            return Err(InvalidSetting {
                key: "transfer.bucket_max_bytes",
                reason: "must be positive: the bucket must never grow without bound",
            });
        }
        if self.max_bytes_per_sec == Some(0) {
            return Err(InvalidSetting {
                key: "transfer.max_bytes_per_sec",
                reason: "must be positive; leave it out for no cap",
            });
        }
        if self.default_ttl_ms == 0 || self.default_ttl_ms > self.max_ttl_ms {
            return Err(InvalidSetting {
                key: "transfer.default_ttl_ms",
                reason: "must be positive and at most max_ttl_ms",
            });
        }
        Ok(())
    }

    /// The fetch window for a source `rtt` away: twice the chunks of the bandwidth-delay
    /// product of [`Self::link_bytes_per_sec`] (a pull consumer asks for more only once half of
    /// what it asked for has arrived), at least [`Self::fetch_window`] and at most
    /// [`Self::max_fetch_window`].
    pub fn fetch_window_for(&self, rtt: Duration) -> usize {
        let in_flight = 2.0 * self.link_bytes_per_sec as f64 * rtt.as_secs_f64();
        let chunks = (in_flight / self.chunk_size.max(1) as f64).ceil();
        let chunks = if chunks.is_finite() && chunks < usize::MAX as f64 {
            chunks as usize
        } else {
            usize::MAX
        };
        chunks.clamp(
            self.fetch_window,
            self.max_fetch_window.max(self.fetch_window),
        )
    }

    /// [`Self::stall_timeout_ms`] as a duration.
    pub fn stall(&self) -> Duration {
        Duration::from_millis(self.stall_timeout_ms)
    }
}

impl Config {
    /// Loads and validates `path`; errors name the file and the key.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = nubis_bus::config::parse_toml(&nubis_bus::config::read(path)?, path)?;
        raw.transfer
            .validate()
            .map_err(|e| ConfigError::invalid(path, e.key, e.reason))?;
        Ok(Self {
            site: raw.site,
            proxy: raw.proxy,
            nats: Credentials::from_keys(
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
            )?,
            identity_file: raw.identity_file,
            store_dir: raw.store_dir,
            partners: raw.partners,
            transfer: raw.transfer,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nats_password_can_come_from_a_private_file() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("nats.pw");
        std::fs::write(&pw, "s3cret\n").unwrap();
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
        let p = dir.path().join("proxy.toml");
        std::fs::write(
            &p,
            "site = \"a\"\nproxy = \"p1\"\nnats_url = \"nats://127.0.0.1:4222\"\nnats_user = \"site\"\nnats_password_file = \"nats.pw\"\nidentity_file = \"/k\"\nstore_dir = \"/s\"\n[transfer]\nroots = [\"/vms\"]\n",
        )
        .unwrap();
        let c = Config::load(&p).unwrap();
        assert_eq!(c.nats.login.as_ref().unwrap().password, "s3cret");
        assert!(!format!("{c:?}").contains("s3cret"));
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = Config::load(&p).unwrap_err();
        assert_eq!(err.key(), Some("nats_password_file"), "{err}");
    }

    #[test]
    fn minimal_config_loads_and_bad_values_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("proxy.toml");
        std::fs::write(
            &p,
            "site = \"a\"\nproxy = \"p1\"\nnats_url = \"nats://127.0.0.1:4222\"\nidentity_file = \"/k\"\nstore_dir = \"/s\"\n[transfer]\nroots = [\"/vms\"]\n",
        )
        .unwrap();
        let c = Config::load(&p).unwrap();
        assert_eq!(c.transfer.chunk_size, 1 << 20);
        assert_eq!(c.transfer.roots, vec![PathBuf::from("/vms")]);
        // The roots are required, and absolute.
        for transfer in [
            "",
            "[transfer]\nroots = []\n",
            "[transfer]\nroots = [\"vms\"]\n",
        ] {
            std::fs::write(
                &p,
                format!("site = \"a\"\nproxy = \"p1\"\nnats_url = \"nats://127.0.0.1:4222\"\nidentity_file = \"/k\"\nstore_dir = \"/s\"\n{transfer}"),
            )
            .unwrap();
            let err = Config::load(&p).unwrap_err();
            assert_eq!(err.key(), Some("transfer.roots"), "{err}");
        }
        std::fs::write(
            &p,
            "site = \"a\"\nproxy = \"p1\"\nnats_url = \"nats://x:4222\"\nidentity_file = \"/k\"\nstore_dir = \"/s\"\n[transfer]\nroots = [\"/vms\"]\nchunk_size = 100000000\n",
        )
        .unwrap();
        let err = Config::load(&p).unwrap_err();
        assert_eq!(err.key(), Some("transfer.chunk_size"), "{err}");
        assert!(
            err.to_string().starts_with(&p.display().to_string()),
            "{err}"
        );
        std::fs::write(&p, "site = \"a\"\nbogus = 1\n").unwrap();
        assert!(matches!(Config::load(&p), Err(ConfigError::Parse { .. })));
    }

    #[test]
    fn the_fetch_window_follows_the_bandwidth_delay_product_within_its_bounds() {
        let s = TransferSettings::default();
        // On loopback the configured window stands.
        assert_eq!(s.fetch_window_for(Duration::from_micros(300)), 8);
        // 1 Gbit/s over a 50 ms round trip: 6.25 MB in flight, twice that asked for, 1 MiB
        // chunks.
        assert_eq!(s.fetch_window_for(Duration::from_millis(50)), 12);
        // 100 Mbit/s over the same round trip needs no more than the configured window.
        let slow = TransferSettings {
            link_bytes_per_sec: 12_500_000,
            ..TransferSettings::default()
        };
        assert_eq!(slow.fetch_window_for(Duration::from_millis(50)), 8);
        // Never beyond the bound, whatever the round trip.
        assert_eq!(s.fetch_window_for(Duration::from_secs(5)), 64);
        assert_eq!(s.fetch_window_for(Duration::MAX), 64);
    }
}
