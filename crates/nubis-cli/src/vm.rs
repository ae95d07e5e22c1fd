//! `nubis vm …`: deploy, migrate, evict, control, status, cancel and list VMs through a site's
//! operator API, with a progress bar (bytes, rate, ETA) that never runs backwards.

use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use nubis_protocol::subject::OpsEndpoint;
use serde_json::{json, Value};

use crate::ops_client::{call, Connection, OpsFailure};

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

/// Follows a migration until it ends; returns its final view.
pub async fn follow(
    conn: &Connection,
    migration: &str,
    json_out: bool,
) -> Result<Value, OpsFailure> {
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
    loop {
        let v = call(conn, OpsEndpoint::Vms, json!({"migration": migration})).await?;
        let phase = v["phase"].as_str().unwrap_or("?").to_string();
        let total = v["bytes_total"].as_u64().unwrap_or(0);
        let done = v["bytes_done"].as_u64().unwrap_or(0);
        if total > 0 {
            bar.set_length(total);
        }
        // Never move backwards, whatever a retried transfer reports.
        if done > shown {
            shown = done;
            bar.set_position(shown);
        }
        match v["failed_rounds"].as_u64().unwrap_or(0) {
            0 => bar.set_message(phase.clone()),
            n => bar.set_message(format!("{phase}, {n} failed transfer round(s)")),
        }
        match phase.as_str() {
            "committed" => {
                bar.set_position(bar.length().unwrap_or(shown).max(shown));
                bar.finish_with_message("committed");
                return Ok(v);
            }
            "aborted" => {
                bar.abandon_with_message("aborted");
                return Err(OpsFailure::Refused {
                    code: "aborted".into(),
                    message: match (v["reason"].as_str(), v["last_failure"].as_str()) {
                        (Some(reason), Some(last)) => {
                            format!("{reason} (last transfer failure: {last})")
                        }
                        (Some(reason), None) => reason.to_string(),
                        (None, _) => "migration aborted".to_string(),
                    },
                });
            }
            _ => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
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

/// Runs a VM command; returns the JSON to print (and prints human output itself).
pub async fn run(cmd: VmCommand, json_out: bool) -> Result<Value, OpsFailure> {
    match cmd {
        VmCommand::Deploy {
            file,
            vm,
            no_wait,
            conn,
        } => {
            let req = descriptor_request(&file, vm, json_out)?;
            let v = call(&conn, OpsEndpoint::Deploy, req).await?;
            let migration = v["migration"].as_str().unwrap_or_default().to_string();
            if !json_out {
                println!(
                    "deploying VM {} (placement {migration})",
                    v["vm"].as_str().unwrap_or("?")
                );
            }
            if no_wait {
                return Ok(v);
            }
            follow(&conn, &migration, json_out).await
        }
        VmCommand::Migrate {
            vm,
            to_site,
            max_rate,
            no_wait,
            conn,
        } => {
            let v = call(
                &conn,
                OpsEndpoint::Migrate,
                json!({"vm": vm, "to_site": to_site, "max_bytes_per_sec": max_rate}),
            )
            .await?;
            let migration = v["migration"].as_str().unwrap_or_default().to_string();
            if !json_out {
                println!("migrating VM {vm} (migration {migration})");
            }
            if no_wait {
                return Ok(v);
            }
            follow(&conn, &migration, json_out).await
        }
        VmCommand::Evict { vm, conn } => call(&conn, OpsEndpoint::Evict, json!({"vm": vm})).await,
        VmCommand::Control { vm, action, conn } => {
            let change = if action == "query" {
                json!({"kind": "query"})
            } else {
                json!({"kind": "set_state", "transition": action})
            };
            call(
                &conn,
                OpsEndpoint::Control,
                json!({"vm": vm, "change": change}),
            )
            .await
        }
        VmCommand::Status { vm, conn } => call(&conn, OpsEndpoint::Vms, json!({"vm": vm})).await,
        VmCommand::Cancel { migration, conn } => {
            call(&conn, OpsEndpoint::Cancel, json!({"migration": migration})).await
        }
        VmCommand::List { conn } => call(&conn, OpsEndpoint::Vms, json!({})).await,
    }
}
