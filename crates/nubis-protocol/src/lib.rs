//! Wire protocol of nubis: the only crate that knows MessagePack, signatures and subject strings.
//!
//! Every control operation of the paper (Migration request, Forced migration, Initiate transfer,
//! Transfer verification, commit/abort, the Control interface) and every monitoring batch travels
//! as a [`envelope::SignedEnvelope`] whose body is one of the typed messages in [`message`],
//! published on a subject built by [`subject::Subject`].

pub mod clip;
pub mod codec;
pub mod descriptor;
pub mod envelope;
pub mod identity;
pub mod ids;
pub mod message;
pub mod ops;
pub mod replay;
pub mod seal;
pub mod subject;
pub mod version;

pub use ids::{IdError, MigrationId, RequestId, SiteId, VmId};
