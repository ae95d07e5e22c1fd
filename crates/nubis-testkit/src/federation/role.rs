//! The users of a server in the federation and what each may do.

/// A user of a server in the federation, as defined in `nats-config/` (see the permission
/// table in `nats-config/README.md`). Host agents have one user each instead, see
/// [`Federation::host_credentials`](super::Federation::host_credentials).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// A site's daemon (`site`): federation requests addressed to the site, the operator API,
    /// its host agents and proxies, JetStream. What
    /// [`Federation::connect`](super::Federation::connect) uses at a site.
    Site,
    /// A site's transfer proxies (`proxy`): their own subjects, JetStream, replies across
    /// sites; not the operator API.
    Proxy,
    /// A site's operator with the `operate` role (`operator`): every endpoint of that site's
    /// operator API, on the shared subjects or as `operator`, the site's JetStream domain, read
    /// access to the directory, monitoring. At the hub, the hub's operator, unrestricted; what
    /// [`Federation::connect`](super::Federation::connect) uses there.
    Operator,
    /// A site's operator with the `read` role (`viewer`): the reading endpoints of that site's
    /// operator API as `viewer`, the audit stream, read access to the directory, monitoring.
    Viewer,
    /// A site's administrator (`admin`): unrestricted inside the site, so it shows what a
    /// site can do at most; the hub's permissions on the leaf connection still apply.
    Admin,
}

impl Role {
    /// Every role, in a fixed order.
    pub const ALL: [Role; 5] = [
        Role::Site,
        Role::Proxy,
        Role::Operator,
        Role::Viewer,
        Role::Admin,
    ];

    /// The NATS user name of the role.
    pub fn user(self) -> &'static str {
        match self {
            Role::Site => "site",
            Role::Proxy => "proxy",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
            Role::Admin => "admin",
        }
    }

    /// The template placeholder holding the role's password.
    pub(super) fn password_placeholder(self) -> &'static str {
        match self {
            Role::Site => "SITE_PASSWORD",
            Role::Proxy => "PROXY_PASSWORD",
            Role::Operator => "OPERATOR_PASSWORD",
            Role::Viewer => "VIEWER_PASSWORD",
            Role::Admin => "ADMIN_PASSWORD",
        }
    }

    /// Whether the server has a user for this role: every site has all of them, the hub only
    /// its operator.
    pub(super) fn exists_on(self, server_is_hub: bool) -> bool {
        !server_is_hub || self == Role::Operator
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.user())
    }
}
