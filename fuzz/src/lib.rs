//! What the fuzz targets share: a verifier at site `b` that pins site `a`'s key.

use std::sync::OnceLock;

use nubis_protocol::envelope::Verifier;
use nubis_protocol::identity::SiteIdentity;
use nubis_protocol::replay::ReplayCache;
use nubis_protocol::SiteId;

/// The verifier of site `b`, pinning site `a` (fixed secrets); `None` if it cannot be built.
pub fn verifier() -> Option<&'static Verifier> {
    static V: OnceLock<Option<Verifier>> = OnceLock::new();
    V.get_or_init(|| {
        let a = SiteIdentity::from_secrets(SiteId::new("a").ok()?, [1; 32], [2; 32]);
        let cache = ReplayCache::temporary(600_000).ok()?;
        Some(Verifier::new(SiteId::new("b").ok()?, [(a.site().clone(), a.public().signing)], cache))
    })
    .as_ref()
}
