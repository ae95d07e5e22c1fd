//! Recognising a concrete nubis subject: [`Subject::parse`] and what it returns.

use super::{
    is_dotted_tokens, FederationOp, OpsEndpoint, ProxyOp, Subject, SubjectError, MAX_OP_LEN,
};
use crate::descriptor::{DataPoint, DataPointClass};
use crate::ids::{MigrationId, SiteId, VmId};
use crate::message::{Body, HostId, MonitoringBatch, ProxyId, ProxyUri};

impl Subject {
    /// Recognises a concrete (wildcard-free) nubis subject.
    pub fn parse(s: &str) -> Result<ParsedSubject, SubjectError> {
        let unrecognised = || SubjectError::Unrecognised(s.chars().take(256).collect());
        let rest = s.strip_prefix("nubis.").ok_or_else(unrecognised)?;
        let (area, rest) = rest.split_once('.').ok_or_else(unrecognised)?;
        let (first, rest) = rest.split_once('.').ok_or_else(unrecognised)?;
        match area {
            "fed" => {
                let site = SiteId::new(first)?;
                let op = FederationOp::from_suffix(rest).ok_or_else(unrecognised)?;
                Ok(ParsedSubject::Federation { site, op })
            }
            "proxy" => {
                let site = SiteId::new(first)?;
                let (proxy, op) = rest.split_once('.').ok_or_else(unrecognised)?;
                let proxy = ProxyUri::new(site, ProxyId::new(proxy)?);
                if let Some(m) = op.strip_prefix("progress.") {
                    let migration = m.parse().map_err(|_| unrecognised())?;
                    return Ok(ParsedSubject::ProxyProgress { proxy, migration });
                }
                let op = ProxyOp::ALL
                    .into_iter()
                    .find(|o| o.as_str() == op)
                    .ok_or_else(unrecognised)?;
                Ok(ParsedSubject::Proxy { proxy, op })
            }
            "mon" => {
                let primary = SiteId::new(first)?;
                let (vm, name) = rest.split_once('.').ok_or_else(unrecognised)?;
                let vm = VmId::new(vm)?;
                let data_point = if let Some(infra) = name.strip_prefix("infra.") {
                    DataPoint::new(infra).map_err(|_| SubjectError::Token(infra.to_owned()))?
                } else if name == "kpi" || name.starts_with("kpi.") {
                    DataPoint::new(name).map_err(|_| SubjectError::Token(name.to_owned()))?
                } else {
                    return Err(unrecognised());
                };
                if data_point.class() == DataPointClass::Kpi && name.starts_with("infra.") {
                    // `infra.kpi.…` would not round-trip through `monitoring`.
                    return Err(unrecognised());
                }
                Ok(ParsedSubject::Monitoring {
                    primary,
                    vm,
                    data_point,
                })
            }
            "site" => {
                let site = SiteId::new(first)?;
                let rest = rest.strip_prefix("host.").ok_or_else(unrecognised)?;
                let (host, op) = rest.split_once('.').ok_or_else(unrecognised)?;
                let host = HostId::new(host)?;
                if !is_dotted_tokens(op, MAX_OP_LEN) {
                    return Err(SubjectError::Token(op.to_owned()));
                }
                Ok(ParsedSubject::Host {
                    site,
                    host,
                    op: op.to_owned(),
                })
            }
            "ops" => {
                let site = SiteId::new(first)?;
                let endpoint = OpsEndpoint::ALL
                    .into_iter()
                    .find(|e| e.as_str() == rest)
                    .ok_or_else(unrecognised)?;
                Ok(ParsedSubject::Ops { site, endpoint })
            }
            _ => Err(unrecognised()),
        }
    }
}

/// A recognised subject, as returned by [`Subject::parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParsedSubject {
    /// `nubis.fed.<site>.<op>`
    Federation {
        /// The answering site.
        site: SiteId,
        /// The operation.
        op: FederationOp,
    },
    /// `nubis.proxy.<site>.<proxy>.<op>`
    Proxy {
        /// The proxy.
        proxy: ProxyUri,
        /// The operation.
        op: ProxyOp,
    },
    /// `nubis.proxy.<site>.<proxy>.progress.<migration>`
    ProxyProgress {
        /// The proxy.
        proxy: ProxyUri,
        /// The migration whose transfer progresses.
        migration: MigrationId,
    },
    /// `nubis.mon.<primary>.<vm>.infra.<dp>` or `nubis.mon.<primary>.<vm>.kpi.<…>`
    Monitoring {
        /// The VM's primary site.
        primary: SiteId,
        /// The VM.
        vm: VmId,
        /// The data point (for KPIs including the leading `kpi.`).
        data_point: DataPoint,
    },
    /// `nubis.site.<site>.host.<host>.<op>`
    Host {
        /// The site.
        site: SiteId,
        /// The host.
        host: HostId,
        /// The operation tokens.
        op: String,
    },
    /// `nubis.ops.<site>.<endpoint>`
    Ops {
        /// The site.
        site: SiteId,
        /// The endpoint.
        endpoint: OpsEndpoint,
    },
}

impl ParsedSubject {
    /// The body type a signed message on this subject must carry, where that is fixed.
    pub fn expected_body_type(&self) -> Option<&'static str> {
        match self {
            Self::Federation { op, .. } => Some(op.request_type()),
            Self::Monitoring { .. } => Some(MonitoringBatch::TYPE),
            _ => None,
        }
    }
}
