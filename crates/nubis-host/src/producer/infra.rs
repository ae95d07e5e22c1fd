//! The infrastructure data points of a Producer (paper section IV), computed by [`infra_value`]
//! from the [`Rates`] of one sampling interval. The site computes usage from them (CPU-hours are
//! the integral of `cpu.cores` over time).
//!
//! | data point | value | meaning |
//! |---|---|---|
//! | `cpu.utilisation` | float | CPU time used over the time all vCPUs could have used, 0..1 |
//! | `cpu.cores` | float | `cpu.utilisation` × vCPUs: how many cores were busy |
//! | `mem.allocated_bytes` | int | memory currently given to the VM |
//! | `mem.used_bytes` | int | allocated minus what the guest reports unused (only with a balloon driver) |
//! | `disk.read_bytes_rate`, `disk.write_bytes_rate` | float | bytes/s, summed over all disks |
//! | `disk.read_requests_rate`, `disk.write_requests_rate` | float | requests/s, summed over all disks |
//! | `net.rx_bytes_rate`, `net.tx_bytes_rate` | float | bytes/s, summed over all interfaces |
//! | `net.rx_packets_rate`, `net.tx_packets_rate` | float | packets/s, summed over all interfaces |
//! | `disk.<dev>.<rate>` | float | one of the four disk rates of one disk, e.g. `disk.vda.read_bytes_rate` |
//! | `net.<dev>.<rate>` | float | one of the four network rates of one interface, e.g. `net.vnet0.rx_bytes_rate` |
//! | `state` | int | the DMTF/CIM `EnabledState` value (2 running, 9 paused, …) |
//!
//! In `<dev>` every character outside `[A-Za-z0-9_-]` of the device name becomes `_`. A
//! specifier on any other infrastructure name yields nothing (logged once, at debug).

use nubis_protocol::message::Value;

use crate::sampling::Rates;

/// The fixed infrastructure data points (the per-device ones are formed from device names).
pub const INFRA_DATA_POINTS: &[&str] = &[
    "cpu.utilisation",
    "cpu.cores",
    "mem.allocated_bytes",
    "mem.used_bytes",
    "disk.read_bytes_rate",
    "disk.write_bytes_rate",
    "disk.read_requests_rate",
    "disk.write_requests_rate",
    "net.rx_bytes_rate",
    "net.tx_bytes_rate",
    "net.rx_packets_rate",
    "net.tx_packets_rate",
    "state",
];

/// Replaces what a data point token may not contain.
pub fn device_token(device: &str) -> String {
    let t: String = device
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if t.is_empty() {
        "_".into()
    } else {
        t
    }
}

fn kib_bytes(kib: u64) -> Value {
    Value::Int(i64::try_from(kib.saturating_mul(1024)).unwrap_or(i64::MAX))
}

/// The value of infrastructure data point `name` for one interval's `rates` of a VM with
/// `vcpus` virtual CPUs; `None` for a name that is not measured (see the module table).
pub fn infra_value(rates: &Rates, vcpus: u32, name: &str) -> Option<Value> {
    let disk = |f: fn(&crate::sampling::DiskRates) -> f64| {
        Some(Value::Float(rates.disks.iter().map(f).sum()))
    };
    let net = |f: fn(&crate::sampling::InterfaceRates) -> f64| {
        Some(Value::Float(rates.interfaces.iter().map(f).sum()))
    };
    match name {
        "cpu.utilisation" => return Some(Value::Float(rates.cpu_utilisation)),
        "cpu.cores" => {
            return Some(Value::Float(rates.cpu_utilisation * f64::from(vcpus)));
        }
        "mem.allocated_bytes" => return Some(kib_bytes(rates.memory.current_kib)),
        "mem.used_bytes" => {
            return rates
                .memory
                .unused_kib
                .map(|u| kib_bytes(rates.memory.current_kib.saturating_sub(u)));
        }
        "state" => {
            return Some(Value::Int(
                rates.state.cim_enabled_state().map_or(0, i64::from),
            ))
        }
        "disk.read_bytes_rate" => return disk(|d| d.rd_bytes_per_s),
        "disk.write_bytes_rate" => return disk(|d| d.wr_bytes_per_s),
        "disk.read_requests_rate" => return disk(|d| d.rd_req_per_s),
        "disk.write_requests_rate" => return disk(|d| d.wr_req_per_s),
        "net.rx_bytes_rate" => return net(|i| i.rx_bytes_per_s),
        "net.tx_bytes_rate" => return net(|i| i.tx_bytes_per_s),
        "net.rx_packets_rate" => return net(|i| i.rx_packets_per_s),
        "net.tx_packets_rate" => return net(|i| i.tx_packets_per_s),
        _ => {}
    }
    let mut tokens = name.split('.');
    let (Some(kind), Some(dev), Some(rate), None) =
        (tokens.next(), tokens.next(), tokens.next(), tokens.next())
    else {
        return None;
    };
    match kind {
        "disk" => {
            let d = rates
                .disks
                .iter()
                .find(|d| device_token(&d.device) == dev)?;
            Some(Value::Float(match rate {
                "read_bytes_rate" => d.rd_bytes_per_s,
                "write_bytes_rate" => d.wr_bytes_per_s,
                "read_requests_rate" => d.rd_req_per_s,
                "write_requests_rate" => d.wr_req_per_s,
                _ => return None,
            }))
        }
        "net" => {
            let i = rates
                .interfaces
                .iter()
                .find(|i| device_token(&i.device) == dev)?;
            Some(Value::Float(match rate {
                "rx_bytes_rate" => i.rx_bytes_per_s,
                "tx_bytes_rate" => i.tx_bytes_per_s,
                "rx_packets_rate" => i.rx_packets_per_s,
                "tx_packets_rate" => i.tx_packets_per_s,
                _ => return None,
            }))
        }
        _ => None,
    }
}
