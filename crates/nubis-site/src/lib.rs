//! The Management-layer daemon of one site (`nubis site`).
//!
//! It holds the site's identity and partner contracts, registers the site in the federation
//! directory and keeps a verified view of it, and answers the operator API. The migration roles of
//! the paper (Controller, Intermediary, Destination, Source) build on these pieces.

pub mod config;
pub mod controller;
pub mod daemon;
pub mod directory;
pub mod federation;
pub mod infrastructure;
pub mod journal;
pub mod local;
pub mod ops;
pub mod roles;
pub mod vm_ops;

pub use daemon::{run, SiteError};
