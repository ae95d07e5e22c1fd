//! Capacity accounting of one host: what it has, what its VMs hold, and whether one more fits.
//!
//! A VM commits its vCPUs, memory and disk space when it is accepted and releases them when it
//! leaves the host (shut down for good, migrated away, evicted). The host reports the totals and
//! the committed amounts to its site, whose placement policy decides with them.

use std::collections::BTreeMap;

use crate::spec::DomainSpec;

/// An amount of each resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Resources {
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Disk space in bytes.
    pub disk_bytes: u64,
}

impl Resources {
    /// What a domain needs.
    pub fn of(spec: &DomainSpec) -> Self {
        Self {
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            disk_bytes: spec.disk_bytes(),
        }
    }

    fn saturating_add(self, o: Self) -> Self {
        Self {
            vcpus: self.vcpus.saturating_add(o.vcpus),
            memory_mib: self.memory_mib.saturating_add(o.memory_mib),
            disk_bytes: self.disk_bytes.saturating_add(o.disk_bytes),
        }
    }

    fn saturating_sub(self, o: Self) -> Self {
        Self {
            vcpus: self.vcpus.saturating_sub(o.vcpus),
            memory_mib: self.memory_mib.saturating_sub(o.memory_mib),
            disk_bytes: self.disk_bytes.saturating_sub(o.disk_bytes),
        }
    }
}

/// Resources committed to one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// The VM.
    pub vm: String,
    /// What it holds.
    pub resources: Resources,
}

/// Why a commitment was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapacityError {
    /// Not enough of some resource is free.
    #[error("vm {vm:?} does not fit: needs {needed:?}, free {free:?}")]
    DoesNotFit {
        /// The VM.
        vm: String,
        /// What it needs.
        needed: Resources,
        /// What is free.
        free: Resources,
    },
    /// The VM already holds a reservation on this host.
    #[error("vm {0:?} already holds a reservation")]
    AlreadyCommitted(String),
}

/// The capacity ledger of one host.
#[derive(Debug, Clone)]
pub struct Capacity {
    total: Resources,
    committed: BTreeMap<String, Resources>,
}

impl Capacity {
    /// A host with `total` resources and nothing committed.
    pub fn new(total: Resources) -> Self {
        Self {
            total,
            committed: BTreeMap::new(),
        }
    }

    /// Everything the host has.
    pub fn total(&self) -> Resources {
        self.total
    }

    /// The sum of all reservations.
    pub fn committed(&self) -> Resources {
        self.committed
            .values()
            .fold(Resources::default(), |sum, r| sum.saturating_add(*r))
    }

    /// What is not committed.
    pub fn free(&self) -> Resources {
        self.total.saturating_sub(self.committed())
    }

    /// The reservation of `vm`, if it holds one.
    pub fn reservation(&self, vm: &str) -> Option<Reservation> {
        self.committed.get(vm).map(|r| Reservation {
            vm: vm.to_string(),
            resources: *r,
        })
    }

    /// Commits `needed` to `vm` if every resource fits in what is free.
    pub fn try_commit(
        &mut self,
        vm: &str,
        needed: Resources,
    ) -> Result<Reservation, CapacityError> {
        if self.committed.contains_key(vm) {
            return Err(CapacityError::AlreadyCommitted(vm.to_string()));
        }
        let free = self.free();
        if needed.vcpus > free.vcpus
            || needed.memory_mib > free.memory_mib
            || needed.disk_bytes > free.disk_bytes
        {
            return Err(CapacityError::DoesNotFit {
                vm: vm.to_string(),
                needed,
                free,
            });
        }
        self.committed.insert(vm.to_string(), needed);
        tracing::debug!(vm.id = %vm, ?needed, "capacity committed");
        Ok(Reservation {
            vm: vm.to_string(),
            resources: needed,
        })
    }

    /// Commits what `spec` needs to the VM it names.
    pub fn try_commit_spec(&mut self, spec: &DomainSpec) -> Result<Reservation, CapacityError> {
        self.try_commit(&spec.name, Resources::of(spec))
    }

    /// Releases the reservation of `vm` (the VM left the host); returns it, or `None` if it held
    /// none.
    pub fn release(&mut self, vm: &str) -> Option<Reservation> {
        let r = self.committed.remove(vm)?;
        tracing::debug!(vm.id = %vm, "capacity released");
        Some(Reservation {
            vm: vm.to_string(),
            resources: r,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(vcpus: u32, memory_mib: u64, disk_bytes: u64) -> Resources {
        Resources {
            vcpus,
            memory_mib,
            disk_bytes,
        }
    }

    #[test]
    fn refuses_what_does_not_fit_and_frees_on_release() {
        let mut cap = Capacity::new(res(4, 4096, 10_000));
        cap.try_commit("a", res(2, 2048, 4000)).unwrap();
        cap.try_commit("b", res(2, 1024, 4000)).unwrap();
        assert_eq!(cap.free(), res(0, 1024, 2000));
        assert_eq!(cap.committed(), res(4, 3072, 8000));
        // Each resource alone can refuse.
        for (vm, need) in [
            ("c", res(1, 1, 1)),
            ("d", res(0, 1025, 1)),
            ("e", res(0, 1, 2001)),
        ] {
            assert!(
                matches!(
                    cap.try_commit(vm, need),
                    Err(CapacityError::DoesNotFit { .. })
                ),
                "{vm}"
            );
        }
        // A refused VM holds nothing.
        assert_eq!(cap.reservation("c"), None);
        assert_eq!(
            cap.try_commit("a", res(0, 0, 0)),
            Err(CapacityError::AlreadyCommitted("a".into()))
        );
        let released = cap.release("a").unwrap();
        assert_eq!(released.resources, res(2, 2048, 4000));
        assert_eq!(cap.release("a"), None);
        assert_eq!(cap.free(), res(2, 3072, 6000));
        cap.try_commit("c", res(2, 3072, 6000)).unwrap();
        assert_eq!(cap.free(), res(0, 0, 0));
        assert_eq!(cap.total(), res(4, 4096, 10_000));
    }

    #[test]
    fn commits_what_a_spec_needs() {
        let mut spec = DomainSpec::new("vm", 2, 512);
        spec.disks.push(crate::spec::DiskSpec {
            path: "/d.qcow2".into(),
            format: crate::spec::DiskFormat::Qcow2,
            target: "vda".into(),
            capacity_bytes: 1 << 30,
            read_only: false,
        });
        let mut cap = Capacity::new(res(2, 512, 1 << 30));
        let r = cap.try_commit_spec(&spec).unwrap();
        assert_eq!(r.resources, res(2, 512, 1 << 30));
        assert!(cap
            .try_commit_spec(&DomainSpec::new("other", 1, 1))
            .is_err());
    }
}
