//! The boundary between the site's Management-layer roles and its own infrastructure: local host
//! agents (Implementation layer) and the site's Transfer proxy.
//!
//! The roles in [`crate::roles`] never talk to a host or a proxy directly; they call this trait,
//! whose production implementation speaks the site-internal NATS subjects. Nothing that passes
//! through it leaves the site except proxy URIs and transfer tokens — and, for a relaying site,
//! only its own.

use std::future::Future;

use nubis_protocol::descriptor::VmDescriptor;
use nubis_protocol::message::{
    ControlChange, ControlReply, DmtfState, Endpoint, ErrorReply, HostId, Offer, PrepareMode,
    TransferStatus, TransferToken,
};
use nubis_protocol::{MigrationId, VmId};

/// A prepared source: where the VM's files are served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedSource {
    /// Proxy URI and token.
    pub endpoint: Endpoint,
    /// Bytes to move.
    pub total_bytes: u64,
}

/// What the roles need from the site's own hosts and Transfer proxy.
pub trait LocalSite: Send + Sync + 'static {
    /// Migration request handler step 2: for each local host that can take the VM (other than
    /// `exclude`), reserve room and obtain a receiving token from a Transfer proxy.
    fn local_offers(
        &self,
        migration: MigrationId,
        descriptor: &VmDescriptor,
        exclude: Option<&HostId>,
    ) -> impl Future<Output = Result<Vec<(HostId, Offer)>, ErrorReply>> + Send;

    /// Forced migration handler: stop or save the VM on `host` and obtain a serving token.
    fn prepare_source(
        &self,
        migration: MigrationId,
        vm: &VmId,
        host: &HostId,
        mode: PrepareMode,
    ) -> impl Future<Output = Result<PreparedSource, ErrorReply>> + Send;

    /// Primary placement: serve the VM's images from this site's image store.
    fn image_source(
        &self,
        migration: MigrationId,
        descriptor: &VmDescriptor,
    ) -> impl Future<Output = Result<PreparedSource, ErrorReply>> + Send;

    /// Relaying (paper III-D): mint a token at the site's own proxy that fetches the files of
    /// `source` into the proxy's bucket and serves them again under the new token, so the far
    /// end sees only this site's proxy, fetching no faster than `max_bytes_per_sec` (the
    /// migration's cap). Released like an image-store source (no host).
    fn relay(
        &self,
        migration: MigrationId,
        vm: &VmId,
        source: &Endpoint,
        max_bytes_per_sec: Option<u64>,
    ) -> impl Future<Output = Result<PreparedSource, ErrorReply>> + Send;

    /// Initiate transfer handler: the local proxy fetches `source` into `destination`'s token.
    /// Idempotent: a second call reports the progress of the transfer already under way.
    fn initiate(
        &self,
        migration: MigrationId,
        vm: &VmId,
        source: &Endpoint,
        destination: &TransferToken,
        max_bytes_per_sec: Option<u64>,
    ) -> impl Future<Output = Result<TransferStatus, ErrorReply>> + Send;

    /// Transfer verification handler: the local proxy's status of a serving token.
    fn verify(
        &self,
        migration: MigrationId,
        source: &TransferToken,
    ) -> impl Future<Output = Result<TransferStatus, ErrorReply>> + Send;

    /// Commit at the destination: activate the VM on `host` from the received files.
    fn commit_destination(
        &self,
        descriptor: &VmDescriptor,
        host: &HostId,
        token: &TransferToken,
    ) -> impl Future<Output = Result<DmtfState, ErrorReply>> + Send;

    /// Commit at the source: release the VM on `host` (undefine, delete its files) and the token.
    /// With no host (an image-store source) only the token is released.
    fn commit_source(
        &self,
        vm: &VmId,
        host: Option<&HostId>,
        token: &TransferToken,
    ) -> impl Future<Output = Result<(), ErrorReply>> + Send;

    /// Abort at the destination: discard what was received and free the reservation.
    fn abort_destination(
        &self,
        vm: &VmId,
        host: &HostId,
        token: &TransferToken,
    ) -> impl Future<Output = Result<(), ErrorReply>> + Send;

    /// Abort at the source: the VM runs again where it was; the token is released.
    fn abort_source(
        &self,
        vm: &VmId,
        host: Option<&HostId>,
        token: &TransferToken,
    ) -> impl Future<Output = Result<(), ErrorReply>> + Send;

    /// The Control interface at the host that runs the VM (`descriptor` is the current one).
    fn control(
        &self,
        descriptor: &VmDescriptor,
        host: &HostId,
        change: &ControlChange,
    ) -> impl Future<Output = Result<ControlReply, ErrorReply>> + Send;
}
