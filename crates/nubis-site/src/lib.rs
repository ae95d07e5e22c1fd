//! The Management-layer daemon of one site (`nubis site`).
//!
//! It holds the site's identity and partner contracts, registers the site in the federation
//! directory and keeps a verified view of it, and answers the operator API. The migration roles of
//! the paper (Controller, Intermediary, Destination, Source) build on these pieces, and the
//! monitoring service delivers, stores and watches the VMs' monitoring data (section IV).

pub mod accounting;
pub mod audit;
pub mod config;
pub mod controller;
pub mod daemon;
pub mod directory;
pub mod expiry;
#[cfg(test)]
pub(crate) mod fakes;
pub mod federation;
pub mod images;
pub mod infrastructure;
pub mod journal;
pub mod local;
pub mod monitoring;
pub mod ops;
pub mod peers;
pub mod quota;
pub mod retention;
pub mod roles;
pub mod sla;
pub mod usage;
pub mod vm_ops;

pub use daemon::{run, SiteError};
