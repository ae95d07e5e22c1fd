//! Where a proxy may read and write on its host's file system. The paths of a mint request
//! come from the proxy's own site, but they pass through host agents, and the files a transfer
//! writes are named by another site: neither may reach a file outside a VM's directory.
//!
//! - A file to serve and a directory to receive into must lie strictly under one of the
//!   proxy's configured roots (`[transfer] roots`: the VM roots of the site's hosts and its
//!   image store), after every symbolic link is resolved ([`within_roots`]).
//! - A manifest may not name a control file of a VM directory (the host agent's descriptor,
//!   domain marker, console log), whatever it contains ([`check_manifest_names`]); logical
//!   names never hold a `/` and never start with `.` (the protocol's decoder refuses them).

use std::path::{Path, PathBuf};

use nubis_protocol::descriptor::is_image_name;
use nubis_protocol::message::ManifestFile;

/// The names in a VM directory that belong to the host agent, not to the VM's transferable
/// files (see `nubis-host`'s `vm_files`): a received file must never replace them.
pub const RESERVED_NAMES: &[&str] = &[
    "descriptor.msgpack",
    "descriptor.msgpack.tmp",
    "domain",
    "console.log",
];

/// Why a path was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    /// The path cannot be resolved (it does not exist, or a component cannot be read).
    #[error("cannot resolve the path")]
    Resolve(#[source] std::io::Error),
    /// The resolved path is not strictly under any root.
    #[error("outside the proxy's roots")]
    Outside,
}

/// `path` with every symbolic link resolved, if it lies strictly under one of `roots` (also
/// resolved; a root that does not exist contains nothing).
pub fn within_roots(roots: &[PathBuf], path: &Path) -> Result<PathBuf, ConfineError> {
    let resolved = std::fs::canonicalize(path).map_err(ConfineError::Resolve)?;
    let inside = roots.iter().any(|root| {
        std::fs::canonicalize(root)
            .is_ok_and(|root| resolved != root && resolved.starts_with(&root))
    });
    if inside {
        Ok(resolved)
    } else {
        Err(ConfineError::Outside)
    }
}

/// Whether a manifest may name `name`: a logical name that is not a control file of a VM
/// directory.
pub fn is_receivable_name(name: &str) -> bool {
    is_image_name(name) && !RESERVED_NAMES.contains(&name)
}

/// Refuses a manifest that names a file a transfer must not write; the reason names it.
pub fn check_manifest_names(files: &[ManifestFile]) -> Result<(), String> {
    match files.iter().find(|f| !is_receivable_name(&f.name)) {
        Some(f) => Err(format!(
            "the manifest names {:?}, which is not a file a transfer may write",
            nubis_protocol::clip::clip_marked(&f.name, 64)
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_resolve_strictly_under_a_root() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("vms");
        std::fs::create_dir_all(root.join("vm-1")).unwrap();
        std::fs::write(root.join("vm-1").join("disk-vda.raw"), b"x").unwrap();
        std::fs::write(tmp.path().join("site.key"), b"secret").unwrap();
        let roots = vec![root.clone(), tmp.path().join("missing")];
        // The legitimate counterpart: a VM's directory and its file.
        assert!(within_roots(&roots, &root.join("vm-1")).is_ok());
        assert!(within_roots(&roots, &root.join("vm-1").join("disk-vda.raw")).is_ok());
        // The root itself, a file beside it, a way out through `..` or a link: refused.
        assert!(matches!(
            within_roots(&roots, &root),
            Err(ConfineError::Outside)
        ));
        assert!(matches!(
            within_roots(&roots, &tmp.path().join("site.key")),
            Err(ConfineError::Outside)
        ));
        assert!(matches!(
            within_roots(&roots, &root.join("vm-1/../../site.key")),
            Err(ConfineError::Outside)
        ));
        std::os::unix::fs::symlink(tmp.path().join("site.key"), root.join("vm-1/state.sav"))
            .unwrap();
        assert!(matches!(
            within_roots(&roots, &root.join("vm-1/state.sav")),
            Err(ConfineError::Outside)
        ));
        assert!(matches!(
            within_roots(&roots, &root.join("vm-1/none")),
            Err(ConfineError::Resolve(_))
        ));
        assert!(matches!(
            within_roots(&[], &root.join("vm-1")),
            Err(ConfineError::Outside)
        ));
    }

    #[test]
    fn manifests_may_not_name_control_files() {
        let file = |name: &str| ManifestFile {
            name: name.to_string(),
            size: 1,
            allocated: 1,
        };
        let ok = [file("disk-vda.qcow2"), file("state.sav"), file("kernel")];
        assert!(check_manifest_names(&ok).is_ok());
        for bad in [
            "descriptor.msgpack",
            "domain",
            "console.log",
            "../x",
            ".hidden",
        ] {
            let err = check_manifest_names(&[file("state.sav"), file(bad)]).unwrap_err();
            assert!(err.contains("not a file a transfer may write"), "{err}");
        }
    }
}
