//! Integration tests: hypervisor.
