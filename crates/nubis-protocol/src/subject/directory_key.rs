//! Key names of the federation directory bucket.
//!
//! Every key carries the id of the one site that may write it, in a fixed position, so that the
//! hub's permissions can give each site's leaf connection exactly its own keys
//! (`nats-config/hub-leaf-user.conf`): `site.<site>`, `proxy.<site>.…`,
//! `producer.<site>.…` and `consumer.<vm>.<site>`.

use std::fmt;

use super::{Subject, DIRECTORY_BUCKET};
use crate::ids::{SiteId, VmId};
use crate::message::{ProducerId, ProxyUri};

/// A key in the directory bucket [`DIRECTORY_BUCKET`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DirectoryKey(String);

impl DirectoryKey {
    /// `site.<site>`: a [`crate::message::SiteEntry`].
    pub fn site(site: &SiteId) -> Self {
        Self(format!("site.{site}"))
    }

    /// `proxy.<site>.<proxy>`: a [`crate::message::ProxyEntry`].
    pub fn proxy(uri: &ProxyUri) -> Self {
        Self(format!("proxy.{}.{}", uri.site(), uri.proxy()))
    }

    /// `producer.<site>.<vm>.<producer>`: a [`crate::message::ProducerRegistration`] written by
    /// `site`, the site whose hosts run the Producer.
    pub fn producer(site: &SiteId, vm: &VmId, producer: &ProducerId) -> Self {
        Self(format!("producer.{site}.{vm}.{producer}"))
    }

    /// `consumer.<vm>.<site>`: a [`crate::message::ConsumerRegistration`].
    pub fn consumer(vm: &VmId, site: &SiteId) -> Self {
        Self(format!("consumer.{vm}.{site}"))
    }

    /// The key as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `$KV.<bucket>.<key>`: the subject a put of this key is published on, which is the
    /// `subject` field of the entry's signed envelope.
    pub fn subject(&self) -> Subject {
        Subject(format!("$KV.{DIRECTORY_BUCKET}.{}", self.0))
    }

    /// Key filter for watching every site entry: `site.*`.
    pub fn sites_filter() -> &'static str {
        "site.*"
    }

    /// Key filter for watching the producers of one VM, whatever site registered them:
    /// `producer.*.<vm>.*`.
    pub fn producers_filter(vm: &VmId) -> String {
        format!("producer.*.{vm}.*")
    }

    /// Key filter for the consumers of one VM: `consumer.<vm>.*`.
    pub fn consumers_filter(vm: &VmId) -> String {
        format!("consumer.{vm}.*")
    }

    /// The site that alone may write this key (the one its layout names), if the key is one of
    /// the directory's forms.
    pub fn writer(&self) -> Option<&str> {
        let mut parts = self.0.split('.');
        let site = match parts.next()? {
            "site" | "proxy" | "producer" => parts.next()?,
            "consumer" => parts.nth(1)?,
            _ => return None,
        };
        Some(site)
    }

    /// A key read from the bucket.
    pub fn from_stored(key: impl Into<String>) -> Self {
        Self(key.into())
    }
}

impl fmt::Display for DirectoryKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
