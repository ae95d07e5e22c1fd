//! The typed client of Transfer proxies, for callers of this crate: it lives in the bus layer,
//! where every signed call is made.

pub use nubis_bus::proxy::ProxyClient;
