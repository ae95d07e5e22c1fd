//! Key names of the federation directory bucket.

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

    /// `producer.<vm>.<producer>`: a [`crate::message::ProducerRegistration`].
    pub fn producer(vm: &VmId, producer: &ProducerId) -> Self {
        Self(format!("producer.{vm}.{producer}"))
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

    /// Key filter for watching the producers of one VM: `producer.<vm>.*`.
    pub fn producers_filter(vm: &VmId) -> String {
        format!("producer.{vm}.*")
    }
}

impl fmt::Display for DirectoryKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
