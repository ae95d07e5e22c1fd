//! `nubis vm …`: deploy, migrate, evict, control, status, cancel and list VMs through a site's
//! operator API, with a progress bar (bytes, rate, ETA) that never runs backwards, and tables
//! for people (the site's JSON with `--json`).

use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use nubis_bus::ops::{OpsClient, FOLLOW_INTERVAL};
use nubis_protocol::ops::{
    CancelReply, ControlView, EvictReply, MigrationPhase, MigrationStarted, MigrationView, VmView,
    VmsReply,
};
use nubis_protocol::subject::OpsEndpoint;
use nubis_protocol::MigrationId;
use serde_json::{json, Value};

use crate::ops_client::{client, Connection, OpsFailure};
use crate::output::{self, Printed};

/// VM commands.
#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Deploy a VM described in an OVF envelope (`.ovf`) or a TOML descriptor (`.toml`, see
    /// `deploy/examples/vm.toml`); this site becomes its primary site.
    Deploy {
        /// The descriptor file.
        file: PathBuf,
        /// The VM id (default: from the OVF VirtualSystem id, or `vm` in the TOML file).
        #[arg(long)]
        vm: Option<String>,
        /// Return at once instead of following the placement.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        conn: Connection,
    },
    /// Migrate a VM this site is responsible for (the site acts as Controller).
    Migrate {
        /// The VM.
        vm: String,
        /// Only consider this partner (or this site's own hosts, when it names this site).
        #[arg(long)]
        to_site: Option<String>,
        /// Cap the file transfer at this many bytes per second (the transfer proxies pace it).
        #[arg(long, value_name = "BYTES_PER_SEC", value_parser = clap::value_parser!(u64).range(1..))]
        max_rate: Option<u64>,
        /// Return at once instead of following the migration.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        conn: Connection,
    },
    /// Ask that a VM leave this site (Forced migration up the chain).
    Evict {
        /// The VM.
        vm: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// Change a VM's state (start, shutdown, power_off, pause, resume, suspend, reboot, reset)
    /// or query it (`query`), through the chain to the host that runs it.
    Control {
        /// The VM.
        vm: String,
        /// The transition, or `query`.
        action: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// Show a VM: next hop, phase, migrations with progress.
    Status {
        /// The VM.
        vm: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// Cancel a migration that has not reached its hand-over.
    Cancel {
        /// The migration id.
        migration: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// List the VMs this site is responsible for.
    List {
        #[command(flatten)]
        conn: Connection,
    },
}

/// Follows a migration until it ends, with a progress bar unless `json_out`; returns its final
/// view when it committed.
pub async fn follow(
    client: &OpsClient,
    migration: &MigrationId,
    json_out: bool,
) -> Result<MigrationView, OpsFailure> {
    let bar = if json_out {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} {msg:<14} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    };
    let mut shown = 0u64;
    let view = client
        .follow_migration(migration, FOLLOW_INTERVAL, |v| {
            if v.bytes_total > 0 {
                bar.set_length(v.bytes_total);
            }
            // Never move backwards, whatever a retried transfer reports.
            if v.bytes_done > shown {
                shown = v.bytes_done;
                bar.set_position(shown);
            }
            match v.failed_rounds {
                0 => bar.set_message(v.phase.to_string()),
                n => bar.set_message(format!("{}, {n} failed transfer round(s)", v.phase)),
            }
        })
        .await?;
    match view.phase {
        MigrationPhase::Committed => {
            bar.set_position(bar.length().unwrap_or(shown).max(shown));
            bar.finish_with_message("committed");
            Ok(view)
        }
        _ => {
            bar.abandon_with_message("aborted");
            Err(OpsFailure::Refused {
                code: "aborted".into(),
                message: match (&view.reason, &view.last_failure) {
                    (Some(reason), Some(last)) => {
                        format!("{reason} (last transfer failure: {last})")
                    }
                    (Some(reason), None) => reason.clone(),
                    (None, _) => "migration aborted".to_string(),
                },
            })
        }
    }
}

/// One line on a migration that ended.
fn migration_done(v: &MigrationView) -> String {
    format!(
        "migration {} of VM {} {} after {}: {} moved, {} offer(s), {} failed transfer round(s)\n",
        v.migration,
        v.vm,
        v.phase,
        output::duration_s(v.elapsed_s),
        output::bytes(v.bytes_done as f64),
        v.offers,
        v.failed_rounds
    )
}

/// The progress of a migration: `1.0 MiB / 2.0 MiB (50%)`, or the queue position.
fn progress(m: &MigrationView) -> String {
    if m.queue_position > 0 {
        return format!("queued at {}", m.queue_position);
    }
    let pct = (m.bytes_done.saturating_mul(100))
        .checked_div(m.bytes_total)
        .map(|p| format!(" ({}%)", p.min(100)))
        .unwrap_or_default();
    format!(
        "{} / {}{pct}",
        output::bytes(m.bytes_done as f64),
        output::bytes(m.bytes_total as f64)
    )
}

/// The table of many VMs.
fn vms_table(reply: &VmsReply) -> String {
    if reply.vms.is_empty() {
        return "no VMs at this site\n".into();
    }
    let mut t = output::Table::new(&[
        "VM",
        "PRIMARY",
        "UPSTREAM",
        "NEXT HOP",
        "PHASE",
        ">VERSION",
        "LAST MIGRATION",
    ]);
    for v in &reply.vms {
        t.row(vec![
            v.vm.to_string(),
            v.primary.to_string(),
            output::or_dash(v.upstream.as_ref()),
            output::or_dash(v.next_hop.as_ref()),
            v.phase.to_string(),
            v.descriptor_version.to_string(),
            v.migrations.last().map_or_else(
                || "-".to_string(),
                |m| format!("{} ({})", m.phase, output::duration_s(m.elapsed_s)),
            ),
        ]);
    }
    t.render()
}

/// One VM in detail, with its migrations.
fn vm_text(v: &VmView) -> String {
    let mut text = output::fields(&[
        ("VM", v.vm.to_string()),
        ("primary", v.primary.to_string()),
        ("upstream", output::or_dash(v.upstream.as_ref())),
        ("next hop", output::or_dash(v.next_hop.as_ref())),
        ("phase", v.phase.to_string()),
        ("descriptor", format!("version {}", v.descriptor_version)),
    ]);
    if v.migrations.is_empty() {
        text.push_str("\nno migrations controlled by this site\n");
        return text;
    }
    let mut t = output::Table::new(&[
        "MIGRATION",
        "PHASE",
        ">PROGRESS",
        ">ELAPSED",
        ">OFFERS",
        ">FAILED ROUNDS",
        "NOTE",
    ]);
    for m in &v.migrations {
        t.row(vec![
            m.migration.to_string(),
            m.phase.to_string(),
            progress(m),
            output::duration_s(m.elapsed_s),
            m.offers.to_string(),
            m.failed_rounds.to_string(),
            match (&m.reason, &m.last_failure) {
                (Some(r), _) => r.clone(),
                (None, Some(f)) => format!("last failure: {f}"),
                (None, None) => String::new(),
            },
        ]);
    }
    text.push('\n');
    text.push_str(&t.render());
    text
}

/// A VM id from free text: lower case, other characters replaced by `-`.
fn id_from(text: &str) -> String {
    let id: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    id.trim_matches('-').chars().take(64).collect()
}

fn descriptor_request(
    file: &PathBuf,
    vm: Option<String>,
    json_out: bool,
) -> Result<Value, OpsFailure> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| OpsFailure::User(format!("cannot read {}: {e}", file.display())))?;
    let is_ovf = file
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("ovf"));
    if is_ovf {
        let package = nubis_ovf::OvfPackage::parse(&text)
            .map_err(|e| OpsFailure::User(format!("{}: {e}", file.display())))?;
        if !json_out {
            for ignored in &package.ignored {
                eprintln!("note: ignored {ignored:?}");
            }
        }
        let t = package.template;
        let vm = vm.unwrap_or_else(|| id_from(&t.system_id));
        let vcpus = t.vcpus.ok_or_else(|| {
            OpsFailure::User(format!(
                "{}: no vCPU item in the VirtualHardwareSection",
                file.display()
            ))
        })?;
        let memory = t.memory_mib.ok_or_else(|| {
            OpsFailure::User(format!(
                "{}: no memory item in the VirtualHardwareSection",
                file.display()
            ))
        })?;
        return Ok(json!({
            "vm": vm,
            "name": t.name,
            "hardware": {
                "vcpus": vcpus,
                "memory_mib": memory,
                "disks": serde_json::to_value(&t.disks).map_err(|e| OpsFailure::Internal(e.to_string()))?,
                "networks": serde_json::to_value(&t.networks).map_err(|e| OpsFailure::Internal(e.to_string()))?,
                "boot": serde_json::to_value(&t.boot).map_err(|e| OpsFailure::Internal(e.to_string()))?,
            },
            "monitoring": serde_json::to_value(&t.monitoring).map_err(|e| OpsFailure::Internal(e.to_string()))?,
            "properties": t.properties,
        }));
    }
    let value: toml::Value = toml::from_str(&text)
        .map_err(|e| OpsFailure::User(format!("{}: {}", file.display(), e.to_string().trim())))?;
    let mut json = serde_json::to_value(value).map_err(|e| OpsFailure::Internal(e.to_string()))?;
    if let (Some(vm), Some(obj)) = (vm, json.as_object_mut()) {
        obj.insert("vm".into(), Value::String(vm));
    }
    Ok(json)
}

/// Runs a VM command; returns what to print (the progress of a migration it prints itself).
pub async fn run(cmd: VmCommand, json_out: bool) -> Result<Printed, OpsFailure> {
    match cmd {
        VmCommand::Deploy {
            file,
            vm,
            no_wait,
            conn,
        } => {
            let req = descriptor_request(&file, vm, json_out)?;
            let client = client(&conn).await?;
            let started: MigrationStarted = client.call(OpsEndpoint::Deploy, &req).await?;
            if !json_out {
                println!(
                    "deploying VM {} (placement {})",
                    started.vm, started.migration
                );
            }
            if no_wait {
                let text = format!("follow it with `nubis vm status {}`\n", started.vm);
                return Ok(Printed::new(&started, text));
            }
            let view = follow(&client, &started.migration, json_out).await?;
            Ok(Printed::new(&view, migration_done(&view)))
        }
        VmCommand::Migrate {
            vm,
            to_site,
            max_rate,
            no_wait,
            conn,
        } => {
            let client = client(&conn).await?;
            let started: MigrationStarted = client
                .call(
                    OpsEndpoint::Migrate,
                    &json!({"vm": vm, "to_site": to_site, "max_bytes_per_sec": max_rate}),
                )
                .await?;
            if !json_out {
                println!("migrating VM {vm} (migration {})", started.migration);
            }
            if no_wait {
                let text = format!("follow it with `nubis vm status {vm}`\n");
                return Ok(Printed::new(&started, text));
            }
            let view = follow(&client, &started.migration, json_out).await?;
            Ok(Printed::new(&view, migration_done(&view)))
        }
        VmCommand::Evict { vm, conn } => {
            let reply: EvictReply = client(&conn)
                .await?
                .call(OpsEndpoint::Evict, &json!({"vm": vm}))
                .await?;
            let text = match (&reply.migration, &reply.notice, &reply.sent_to) {
                (Some(m), _, _) => format!(
                    "VM {} must leave: this site is its primary and moves it (migration {m})\n",
                    reply.vm
                ),
                (None, notice, to) => format!(
                    "eviction notice {} for VM {} sent to {}, which must move it\n",
                    output::or_dash(notice.as_ref()),
                    reply.vm,
                    output::or_dash(to.as_ref())
                ),
            };
            Ok(Printed::new(&reply, text))
        }
        VmCommand::Control { vm, action, conn } => {
            let change = if action == "query" {
                json!({"kind": "query"})
            } else {
                json!({"kind": "set_state", "transition": action})
            };
            let reply: ControlView = client(&conn)
                .await?
                .call(OpsEndpoint::Control, &json!({"vm": vm, "change": change}))
                .await?;
            let cim = reply
                .cim_enabled_state
                .map_or_else(|| "none".to_string(), |c| c.to_string());
            let state = serde_json::to_value(reply.state)
                .ok()
                .and_then(|s| s.as_str().map(str::to_string))
                .unwrap_or_else(|| format!("{:?}", reply.state));
            let text = format!(
                "VM {}: {state} (CIM EnabledState {cim}), descriptor version {}\n",
                reply.vm, reply.descriptor_version
            );
            Ok(Printed::new(&reply, text))
        }
        VmCommand::Status { vm, conn } => {
            let reply: VmsReply = client(&conn)
                .await?
                .call(OpsEndpoint::Vms, &json!({"vm": vm}))
                .await?;
            let text = match reply.vms.as_slice() {
                [one] => vm_text(one),
                _ => vms_table(&reply),
            };
            Ok(Printed::new(&reply, text))
        }
        VmCommand::Cancel { migration, conn } => {
            let reply: CancelReply = client(&conn)
                .await?
                .call(OpsEndpoint::Cancel, &json!({"migration": migration}))
                .await?;
            let text = format!(
                "migration {} is cancelling (it was in phase {}); it aborts at its next step\n",
                reply.migration, reply.cancelling_in_phase
            );
            Ok(Printed::new(&reply, text))
        }
        VmCommand::List { conn } => {
            let reply: VmsReply = client(&conn)
                .await?
                .call(OpsEndpoint::Vms, &json!({}))
                .await?;
            let text = vms_table(&reply);
            Ok(Printed::new(&reply, text))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn reply() -> VmsReply {
        serde_json::from_value(json!({"vms": [{
            "vm": "vm-1", "primary": "a", "upstream": null, "next_hop": "site:b",
            "phase": "placed", "descriptor_version": 3,
            "migrations": [{"migration": "9a2b0c1d2e3f40516273849a0b1c2d3e", "vm": "vm-1",
                "phase": "committed", "reason": null, "bytes_done": 1048576,
                "bytes_total": 2097152, "offers": 2, "queue_position": 0, "elapsed_s": 125.2,
                "failed_rounds": 1, "last_failure": "digest does not match"}]
        }]}))
        .unwrap()
    }

    #[test]
    fn a_vm_shows_its_migrations_with_units() {
        let text = vm_text(&reply().vms[0]);
        assert!(text.contains("next hop    site:b"), "{text}");
        assert!(text.contains("1.0 MiB / 2.0 MiB (50%)"), "{text}");
        assert!(text.contains("2 m 05 s"), "{text}");
        assert!(
            text.contains("last failure: digest does not match"),
            "{text}"
        );
    }

    #[test]
    fn a_vm_list_is_a_table() {
        let text = vms_table(&reply());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            lines[0].starts_with("VM    PRIMARY  UPSTREAM  NEXT HOP"),
            "{text}"
        );
        assert!(lines[1].contains("committed (2 m 05 s)"), "{text}");
        assert_eq!(
            vms_table(&VmsReply { vms: vec![] }),
            "no VMs at this site\n"
        );
    }
}
