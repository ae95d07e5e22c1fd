//! Names that appear in messages besides sites and VMs: transfer proxies and their URIs,
//! transfer tokens, eviction notices and monitoring producers.
//!
//! None of them says anything about a host: a [`ProxyUri`] names a site and a proxy id, and a
//! [`TransferToken`] is random, meaningful only inside the Transfer proxy that minted it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::ids::{IdError, SiteId};

/// Names with the alphabet and length of site ids (`[a-z0-9_-]`, starting with a letter or
/// digit), so that they can be subject and key tokens.
use crate::ids::subject_safe_id as token_name;

token_name!(
    /// One Transfer proxy of a site, unique within that site.
    ProxyId
);
token_name!(
    /// An opaque monitoring Producer id chosen by the producing site; never a host name.
    ProducerId
);
token_name!(
    /// A host of a site's Implementation layer. Site-internal: it appears only on
    /// `nubis.site.<site>.host.<host>.…` subjects and never in a message that crosses a site.
    HostId
);

/// 128 random bits written as 32 lower-case hex digits on the wire, like the ids in
/// [`crate::ids`].
use crate::ids::random_id as random_hex;

random_hex!(
    /// The paper's Transfer token: a mapping, known only to the Transfer proxy that minted it,
    /// from a VM to where its files are read from or written to. On the wire it is 32 lower-case
    /// hex digits (a string, so it can also name object-store buckets and appear in `nats` CLI
    /// examples); it encodes nothing about the host or the files.
    TransferToken
);
random_hex!(
    /// One eviction notice (Forced migration up the chain); stable across retries of the notice.
    NoticeId
);

/// Why a string is not a proxy URI.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyUriError {
    /// The URI does not have the form `nats://<site>/proxy/<proxy-id>`.
    #[error("proxy uri must have the form nats://<site>/proxy/<proxy-id>")]
    Form,
    /// The site or proxy part is not a valid identifier.
    #[error("invalid identifier in proxy uri")]
    Id(#[source] IdError),
}

/// The abstract address of a Transfer proxy: `nats://<site>/proxy/<proxy-id>`.
///
/// It names the site (whose JetStream domain serves the transfer buckets) and a proxy of that
/// site; it never names a host, a port or a path. The proxy answers on
/// [`crate::subject::Subject::proxy`] subjects built from these two parts.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProxyUri {
    site: SiteId,
    proxy: ProxyId,
}

impl ProxyUri {
    const SCHEME: &'static str = "nats://";
    const PATH: &'static str = "/proxy/";

    /// The URI of proxy `proxy` of site `site`.
    pub fn new(site: SiteId, proxy: ProxyId) -> Self {
        Self { site, proxy }
    }

    /// The site that runs the proxy.
    pub fn site(&self) -> &SiteId {
        &self.site
    }

    /// The proxy's id within its site.
    pub fn proxy(&self) -> &ProxyId {
        &self.proxy
    }
}

impl fmt::Display for ProxyUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}{}{}{}",
            Self::SCHEME,
            self.site,
            Self::PATH,
            self.proxy
        )
    }
}

impl FromStr for ProxyUri {
    type Err = ProxyUriError;
    fn from_str(s: &str) -> Result<Self, ProxyUriError> {
        let rest = s.strip_prefix(Self::SCHEME).ok_or(ProxyUriError::Form)?;
        let (site, proxy) = rest.split_once(Self::PATH).ok_or(ProxyUriError::Form)?;
        Ok(Self {
            site: SiteId::new(site).map_err(ProxyUriError::Id)?,
            proxy: ProxyId::new(proxy).map_err(ProxyUriError::Id)?,
        })
    }
}

impl Serialize for ProxyUri {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ProxyUri {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_uri_round_trips_and_rejects_hosts() {
        let uri: ProxyUri = "nats://site-b/proxy/p1".parse().unwrap();
        assert_eq!(uri.site().as_str(), "site-b");
        assert_eq!(uri.proxy().as_str(), "p1");
        assert_eq!(uri.to_string(), "nats://site-b/proxy/p1");
        for bad in [
            "nats://site-b/proxy/",
            "nats://10.0.0.1:4222/proxy/p1",
            "nats://site-b/proxy/p1/extra",
            "http://site-b/proxy/p1",
            "nats://site-b/host/p1",
            "nats:///proxy/p1",
        ] {
            assert!(bad.parse::<ProxyUri>().is_err(), "{bad}");
        }
    }

    #[test]
    fn tokens_are_16_bytes_on_the_wire_and_hex_in_json() {
        let t = TransferToken::random();
        let bytes = crate::codec::to_vec(&t).unwrap();
        // bin8 of 16 bytes.
        assert_eq!(&bytes[..2], &[0xc4, 16]);
        assert_eq!(&bytes[2..], &t.0);
        assert_eq!(
            crate::codec::from_slice::<TransferToken>(&bytes).unwrap(),
            t
        );
        // The hex form (JSON, and records written before) is read as well.
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, format!("\"{t}\""));
        assert_eq!(serde_json::from_str::<TransferToken>(&json).unwrap(), t);
        let old = rmp_serde::to_vec(&t.to_string()).unwrap();
        assert_eq!(crate::codec::from_slice::<TransferToken>(&old).unwrap(), t);
        // Neither 15 bytes nor a bad hex string is a token.
        let short = rmp_serde::to_vec(&serde_bytes::Bytes::new(&[1u8; 15])).unwrap();
        assert!(crate::codec::from_slice::<TransferToken>(&short).is_err());
        assert!("zz".parse::<TransferToken>().is_err());
    }

    #[test]
    fn names_use_the_site_id_alphabet() {
        assert!(ProxyId::new("p-1").is_ok());
        assert!(ProducerId::new("a.b").is_err());
        assert!(HostId::new("").is_err());
    }
}
