//! `nubis site status` and `nubis sites`: a site's own state and the federation as it sees it.

use nubis_protocol::ops::{SiteStatus, SitesReply};

use crate::ops_client::{client, Connection, OpsFailure};
use crate::output::{self, Printed};

/// `nubis site status`.
pub async fn status(conn: &Connection) -> Result<Printed, OpsFailure> {
    let status = client(conn).await?.status().await?;
    let text = status_text(&status);
    Ok(Printed::new(&status, text))
}

/// `nubis sites`.
pub async fn sites(conn: &Connection) -> Result<Printed, OpsFailure> {
    let sites = client(conn).await?.sites().await?;
    let text = sites_text(&sites);
    Ok(Printed::new(&sites, text))
}

fn status_text(s: &SiteStatus) -> String {
    output::fields(&[
        ("site", s.site.to_string()),
        ("version", s.version.clone()),
        ("nats-server", s.nats_server_version.clone()),
        (
            "started",
            format!(
                "{} (up {})",
                output::time(s.started_ms),
                output::duration_ms(s.uptime_ms)
            ),
        ),
        (
            "partners",
            format!("{} ({} reachable)", s.partners, s.partners_reachable),
        ),
        (
            "hosts",
            if s.hosts.is_empty() {
                "-".into()
            } else {
                s.hosts.join(", ")
            },
        ),
        ("VMs", s.vms.to_string()),
        ("signing key", s.signing_key.clone()),
    ])
}

fn sites_text(reply: &SitesReply) -> String {
    if reply.sites.is_empty() {
        return "no other sites in the directory, and no partners\n".into();
    }
    let mut t = output::Table::new(&[
        "SITE",
        "PARTNER",
        "TRUSTED",
        "REACHABLE",
        ">HEARTBEAT",
        "PROXIES",
    ]);
    for s in &reply.sites {
        t.row(vec![
            s.site.to_string(),
            output::yes_no(s.partner),
            output::yes_no(s.trusted),
            output::yes_no(s.reachable),
            if s.ever_seen() {
                format!("{} ago", output::duration_ms(s.heartbeat_age_ms))
            } else {
                "never".into()
            },
            if s.proxies.is_empty() {
                "-".into()
            } else {
                s.proxies.join(", ")
            },
        ]);
    }
    t.render()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use serde_json::json;

    #[test]
    fn sites_are_a_table_with_humanised_heartbeats() {
        let reply: SitesReply = serde_json::from_value(json!({"sites": [
            {"site": "b", "partner": true, "trusted": true, "reachable": true,
             "heartbeat_age_ms": 1500, "proxies": ["nats://b-proxy"], "signing_key": null},
            {"site": "partner-c", "partner": true, "trusted": false, "reachable": false,
             "heartbeat_age_ms": u64::MAX, "proxies": [], "signing_key": null}]}))
        .unwrap();
        let text = sites_text(&reply);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "SITE       PARTNER  TRUSTED  REACHABLE  HEARTBEAT  PROXIES"
        );
        assert_eq!(
            lines[1],
            "b          yes      yes      yes        1.5 s ago  nats://b-proxy"
        );
        assert_eq!(
            lines[2],
            "partner-c  yes      no       no             never  -"
        );
    }

    #[test]
    fn status_shows_the_start_as_a_utc_time_and_the_uptime_humanised() {
        let s: SiteStatus = serde_json::from_value(json!({"site": "a", "version": "0.1.0",
            "started_ms": 1767225600000u64, "uptime_ms": 125000, "nats_server_version": "2.11.0",
            "partners": 2, "partners_reachable": 1, "hosts": ["h1", "h2"], "vms": 3,
            "signing_key": "ed25519:AAAA"}))
        .unwrap();
        let text = status_text(&s);
        assert!(
            text.contains("started      2026-01-01T00:00:00Z (up 2 m 05 s)"),
            "{text}"
        );
        assert!(text.contains("hosts        h1, h2"), "{text}");
    }
}
