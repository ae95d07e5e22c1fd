//! The host-agent client over NATS, for callers of this crate: the typed client and its messages
//! live in `nubis_protocol::message::host`, the transport beneath it in the bus layer.

pub use nubis_bus::host::{host_client, NatsTransport};
