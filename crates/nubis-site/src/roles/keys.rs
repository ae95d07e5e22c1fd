//! The keys of a VM's primary site, checked before a site takes a VM in: the descriptor's
//! `primary_keys` decide who can read the VM's sealed monitoring and whose signature its
//! controls carry, so a site on the chain that put its own keys there could read what is
//! sealed for the primary. A site therefore accepts a new VM only under the keys it knows for
//! the primary: pinned in its configuration for a partner, else the primary's directory entry
//! (which only the primary can write, `nats-config/README.md`).

use nubis_protocol::descriptor::{PrimaryKeys, VmDescriptor};
use nubis_protocol::message::{ErrorCode, ErrorReply};
use nubis_protocol::SiteId;

use crate::config::SiteConfig;
use crate::directory::Directory;

/// Where a site finds the keys a site it has no contract with published.
pub trait KeyBook: Send + Sync + std::fmt::Debug {
    /// The keys `site` published, if it is known.
    fn published_keys(&self, site: &SiteId) -> Option<PrimaryKeys>;
}

impl KeyBook for Directory {
    fn published_keys(&self, site: &SiteId) -> Option<PrimaryKeys> {
        self.record(site).map(|r| PrimaryKeys {
            signing: r.entry.signing_key,
            sealing: r.entry.sealing_key,
        })
    }
}

/// The keys `config` knows for `site`: a partner's pinned ones, else what `book` has.
pub fn known_keys(
    config: &SiteConfig,
    book: Option<&dyn KeyBook>,
    site: &SiteId,
) -> Option<PrimaryKeys> {
    if *site == config.site {
        let public = config.identity.public();
        return Some(PrimaryKeys {
            signing: public.signing.to_bytes(),
            sealing: public.sealing,
        });
    }
    if let Some(p) = config.partner(site) {
        return Some(PrimaryKeys {
            signing: p.signing_key.to_bytes(),
            sealing: p.sealing_key,
        });
    }
    book.and_then(|b| b.published_keys(site))
}

/// Refuses a descriptor whose primary keys are not the ones known for its primary site.
pub fn check_primary_keys(
    config: &SiteConfig,
    book: Option<&dyn KeyBook>,
    descriptor: &VmDescriptor,
) -> Result<(), ErrorReply> {
    let primary = &descriptor.primary_site;
    match known_keys(config, book, primary) {
        Some(keys) if keys == descriptor.primary_keys => Ok(()),
        Some(_) => Err(ErrorReply::new(
            ErrorCode::Refused,
            format!(
                "the descriptor of VM {} carries keys that are not those of its primary site {primary}",
                descriptor.id
            ),
        )),
        None => Err(ErrorReply::new(
            ErrorCode::Refused,
            format!(
                "the keys of primary site {primary} of VM {} cannot be checked: it is neither a partner nor in the directory",
                descriptor.id
            ),
        )),
    }
}
