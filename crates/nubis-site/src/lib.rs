//! The Management-layer daemon of one site (`nubis site`).
//!
//! It holds the site's identity and partner contracts, registers the site in the federation
//! directory and keeps a verified view of it, and answers the operator API. The migration roles of
//! the paper (Controller, Intermediary, Destination, Source) build on these pieces.

pub mod config;
pub mod directory;
pub mod daemon;
pub mod ops;

pub use daemon::{run, SiteError};
