//! Infrastructure measurements: turning two successive statistics snapshots of a domain into
//! rates (CPU utilisation, bytes and requests per second).
//!
//! The hypervisor reports cumulative counters. A counter that goes backwards, or a domain whose
//! run id changed between the snapshots, means the domain was started again and its counters
//! began from zero during the interval; the new value is then the whole increase (the rule
//! Prometheus uses for counter resets). A device that appears between snapshots counts from zero
//! too. Two snapshots at the same instant give no rate at all rather than an infinite one.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use crate::dmtf::DmtfState;
use crate::hypervisor::{DomainStats, MemoryStats};

/// Rates of one disk over an interval.
#[derive(Debug, Clone, PartialEq)]
pub struct DiskRates {
    /// Guest device name.
    pub device: String,
    /// Bytes read per second.
    pub rd_bytes_per_s: f64,
    /// Bytes written per second.
    pub wr_bytes_per_s: f64,
    /// Read requests per second.
    pub rd_req_per_s: f64,
    /// Write requests per second.
    pub wr_req_per_s: f64,
}

/// Rates of one network interface over an interval.
#[derive(Debug, Clone, PartialEq)]
pub struct InterfaceRates {
    /// Interface name.
    pub device: String,
    /// Bytes received per second.
    pub rx_bytes_per_s: f64,
    /// Bytes sent per second.
    pub tx_bytes_per_s: f64,
    /// Packets received per second.
    pub rx_packets_per_s: f64,
    /// Packets sent per second.
    pub tx_packets_per_s: f64,
}

/// Measurements of one domain over the interval between two snapshots.
#[derive(Debug, Clone, PartialEq)]
pub struct Rates {
    /// The domain.
    pub name: String,
    /// Length of the interval.
    pub interval: Duration,
    /// Wall-clock time at the end of the interval.
    pub wall_time: SystemTime,
    /// State at the end of the interval.
    pub state: DmtfState,
    /// CPU time used over the interval divided by the CPU time the domain's vCPUs could have
    /// used: 1.0 means every vCPU was busy all the time.
    pub cpu_utilisation: f64,
    /// Memory at the end of the interval (a gauge, not a rate).
    pub memory: MemoryStats,
    /// Per-disk rates.
    pub disks: Vec<DiskRates>,
    /// Per-interface rates.
    pub interfaces: Vec<InterfaceRates>,
    /// Whether the counters restarted during the interval.
    pub counters_reset: bool,
}

/// Two snapshots that give no rate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SampleError {
    /// Both snapshots were taken at the same instant.
    #[error("snapshots taken at the same instant")]
    ZeroInterval,
    /// The second snapshot is older than the first.
    #[error("snapshots out of order")]
    OutOfOrder,
    /// The snapshots are of different domains.
    #[error("snapshots of different domains ({0:?} and {1:?})")]
    DifferentDomains(String, String),
}

/// The increase of a cumulative counter, assuming a restart from zero when it went backwards.
fn increase(prev: u64, cur: u64, reset: bool) -> u64 {
    if reset || cur < prev {
        cur
    } else {
        cur - prev
    }
}

/// Precision loss converting counters to `f64` is far below measurement noise.
#[allow(clippy::cast_precision_loss)]
fn per_second(n: u64, secs: f64) -> f64 {
    n as f64 / secs
}

/// The rates between two snapshots of the same domain.
pub fn rates(prev: &DomainStats, cur: &DomainStats) -> Result<Rates, SampleError> {
    if prev.name != cur.name {
        return Err(SampleError::DifferentDomains(
            prev.name.clone(),
            cur.name.clone(),
        ));
    }
    if cur.taken_at < prev.taken_at {
        return Err(SampleError::OutOfOrder);
    }
    let interval = cur.taken_at - prev.taken_at;
    if interval.is_zero() {
        return Err(SampleError::ZeroInterval);
    }
    let secs = interval.as_secs_f64();
    let restarted = prev.run_id != cur.run_id;
    let cpu_reset = restarted || cur.cpu_time_ns < prev.cpu_time_ns;
    let mut counters_reset = cpu_reset;
    let cpu_ns = increase(prev.cpu_time_ns, cur.cpu_time_ns, restarted);
    let cpu_utilisation = if cur.vcpus == 0 {
        0.0
    } else {
        per_second(cpu_ns, secs) / 1e9 / f64::from(cur.vcpus)
    };

    let disks = cur
        .disks
        .iter()
        .map(|d| {
            let p = prev.disks.iter().find(|p| p.device == d.device);
            let (rb, wb, rr, wr) = p.map_or((0, 0, 0, 0), |p| {
                (p.rd_bytes, p.wr_bytes, p.rd_req, p.wr_req)
            });
            counters_reset |= d.rd_bytes < rb || d.wr_bytes < wb || d.rd_req < rr || d.wr_req < wr;
            DiskRates {
                device: d.device.clone(),
                rd_bytes_per_s: per_second(increase(rb, d.rd_bytes, restarted), secs),
                wr_bytes_per_s: per_second(increase(wb, d.wr_bytes, restarted), secs),
                rd_req_per_s: per_second(increase(rr, d.rd_req, restarted), secs),
                wr_req_per_s: per_second(increase(wr, d.wr_req, restarted), secs),
            }
        })
        .collect();
    let interfaces = cur
        .interfaces
        .iter()
        .map(|i| {
            let p = prev.interfaces.iter().find(|p| p.device == i.device);
            let (rb, tb, rp, tp) = p.map_or((0, 0, 0, 0), |p| {
                (p.rx_bytes, p.tx_bytes, p.rx_packets, p.tx_packets)
            });
            counters_reset |=
                i.rx_bytes < rb || i.tx_bytes < tb || i.rx_packets < rp || i.tx_packets < tp;
            InterfaceRates {
                device: i.device.clone(),
                rx_bytes_per_s: per_second(increase(rb, i.rx_bytes, restarted), secs),
                tx_bytes_per_s: per_second(increase(tb, i.tx_bytes, restarted), secs),
                rx_packets_per_s: per_second(increase(rp, i.rx_packets, restarted), secs),
                tx_packets_per_s: per_second(increase(tp, i.tx_packets, restarted), secs),
            }
        })
        .collect();
    Ok(Rates {
        name: cur.name.clone(),
        interval,
        wall_time: cur.wall_time,
        state: cur.state,
        cpu_utilisation,
        memory: cur.memory,
        disks,
        interfaces,
        counters_reset: counters_reset || restarted,
    })
}

/// Keeps the last snapshot of each domain and turns each new one into rates.
#[derive(Debug, Default)]
pub struct Sampler {
    last: HashMap<String, DomainStats>,
}

impl Sampler {
    /// A sampler that has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `stats`; returns the rates since the previous snapshot of the same domain, or
    /// `None` for its first snapshot. A snapshot that gives no rate (same instant, out of order)
    /// is refused and the previous one kept.
    pub fn observe(&mut self, stats: DomainStats) -> Result<Option<Rates>, SampleError> {
        let out = match self.last.get(&stats.name) {
            None => None,
            Some(prev) => Some(rates(prev, &stats)?),
        };
        self.last.insert(stats.name.clone(), stats);
        Ok(out)
    }

    /// Forgets a domain that left the host.
    pub fn forget(&mut self, name: &str) {
        self.last.remove(name);
    }

    /// How many domains have a previous snapshot.
    pub fn len(&self) -> usize {
        self.last.len()
    }

    /// Whether no domain has a previous snapshot.
    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::hypervisor::{DiskCounters, InterfaceCounters};

    fn snap(at: Instant, run_id: u32, cpu_ns: u64, disk: u64, net: u64) -> DomainStats {
        DomainStats {
            name: "vm".into(),
            run_id: Some(run_id),
            taken_at: at,
            wall_time: SystemTime::UNIX_EPOCH,
            state: DmtfState::Enabled,
            vcpus: 2,
            cpu_time_ns: cpu_ns,
            memory: MemoryStats {
                current_kib: 1024,
                ..MemoryStats::default()
            },
            disks: vec![DiskCounters {
                device: "vda".into(),
                rd_bytes: disk,
                wr_bytes: disk * 2,
                rd_req: disk / 512,
                wr_req: disk / 256,
            }],
            interfaces: vec![InterfaceCounters {
                device: "vnet0".into(),
                rx_bytes: net,
                tx_bytes: net / 2,
                rx_packets: net / 100,
                tx_packets: net / 200,
            }],
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * b.abs().max(1.0)
    }

    #[test]
    fn rates_are_exact_for_synthetic_counters() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_millis(2500);
        // 2.5 s on 2 vCPUs is 5e9 ns available; 1.25e9 ns used is 25 %.
        let a = snap(t0, 7, 10_000_000_000, 1_000_000, 50_000);
        let b = snap(t1, 7, 11_250_000_000, 1_512_000, 300_000);
        let r = rates(&a, &b).unwrap();
        assert!(close(r.cpu_utilisation, 0.25), "{}", r.cpu_utilisation);
        assert!(close(r.disks[0].rd_bytes_per_s, 512_000.0 / 2.5));
        assert!(close(r.disks[0].wr_bytes_per_s, 1_024_000.0 / 2.5));
        assert!(close(r.disks[0].rd_req_per_s, 1000.0 / 2.5));
        assert!(close(r.disks[0].wr_req_per_s, 2000.0 / 2.5));
        assert!(close(r.interfaces[0].rx_bytes_per_s, 250_000.0 / 2.5));
        assert!(close(r.interfaces[0].tx_bytes_per_s, 125_000.0 / 2.5));
        assert!(close(r.interfaces[0].rx_packets_per_s, 2500.0 / 2.5));
        assert!(close(r.interfaces[0].tx_packets_per_s, 1250.0 / 2.5));
        assert_eq!(r.interval, Duration::from_millis(2500));
        assert!(!r.counters_reset);
        assert_eq!(r.memory.current_kib, 1024);
    }

    #[test]
    fn restart_counts_from_zero() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(1);
        let a = snap(t0, 7, 90_000_000_000, 9_000_000, 900_000);
        // Started again (new run id): the new values are the whole increase.
        let b = snap(t1, 8, 500_000_000, 4096, 1000);
        let r = rates(&a, &b).unwrap();
        assert!(r.counters_reset);
        assert!(close(r.cpu_utilisation, 0.25));
        assert!(close(r.disks[0].rd_bytes_per_s, 4096.0));
        assert!(close(r.interfaces[0].rx_bytes_per_s, 1000.0));
        // Same run id but counters went backwards: treated as a reset too, never negative.
        let c = snap(t1, 7, 500_000_000, 4096, 1000);
        let r = rates(&a, &c).unwrap();
        assert!(r.counters_reset);
        assert!(r.cpu_utilisation >= 0.0);
        assert!(close(r.disks[0].wr_bytes_per_s, 8192.0));
    }

    #[test]
    fn new_device_counts_from_zero() {
        let t0 = Instant::now();
        let mut a = snap(t0, 1, 0, 0, 0);
        a.disks.clear();
        let b = snap(t0 + Duration::from_secs(2), 1, 0, 1000, 0);
        let r = rates(&a, &b).unwrap();
        assert!(close(r.disks[0].rd_bytes_per_s, 500.0));
        assert!(close(r.cpu_utilisation, 0.0));
    }

    #[test]
    fn degenerate_intervals_give_no_rate() {
        let t0 = Instant::now();
        let a = snap(t0, 1, 0, 0, 0);
        assert_eq!(rates(&a, &a), Err(SampleError::ZeroInterval));
        let b = snap(t0 + Duration::from_secs(1), 1, 0, 0, 0);
        assert_eq!(rates(&b, &a), Err(SampleError::OutOfOrder));
        let mut other = b.clone();
        other.name = "other".into();
        assert!(matches!(
            rates(&a, &other),
            Err(SampleError::DifferentDomains(..))
        ));
        let mut zero_vcpu = b.clone();
        zero_vcpu.vcpus = 0;
        zero_vcpu.cpu_time_ns = 5;
        assert_eq!(rates(&a, &zero_vcpu).unwrap().cpu_utilisation, 0.0);
    }

    #[test]
    fn sampler_pairs_successive_snapshots() {
        let t0 = Instant::now();
        let mut s = Sampler::new();
        assert!(s.is_empty());
        assert_eq!(s.observe(snap(t0, 1, 0, 0, 0)).unwrap(), None);
        assert_eq!(
            s.observe(snap(t0, 1, 0, 0, 0)),
            Err(SampleError::ZeroInterval)
        );
        let r = s
            .observe(snap(t0 + Duration::from_secs(1), 1, 1_000_000_000, 0, 0))
            .unwrap()
            .unwrap();
        assert!(close(r.cpu_utilisation, 0.5));
        let r = s
            .observe(snap(t0 + Duration::from_secs(2), 1, 1_000_000_000, 0, 0))
            .unwrap()
            .unwrap();
        assert!(close(r.cpu_utilisation, 0.0));
        assert_eq!(s.len(), 1);
        s.forget("vm");
        assert!(s.is_empty());
    }
}
