//! Why an OVF envelope could not be read or mapped to a VM descriptor.
//!
//! Every variant names the element (and, where there is one, the attribute) at fault, in the
//! form an operator finds in the file: `Item (InstanceID 6)`, `Disk "vmdisk1"`.

use nubis_protocol::descriptor::DescriptorError;

use crate::xml::XmlError;

/// Why an OVF envelope was refused.
#[derive(Debug, thiserror::Error)]
pub enum OvfError {
    /// The document is not well-formed XML (or too large or deep).
    #[error("not a readable XML document")]
    Xml(#[from] XmlError),
    /// The root element is not an OVF `Envelope`.
    #[error("root element is {found}, not an OVF Envelope")]
    NotAnEnvelope {
        /// The root element's name as written.
        found: String,
    },
    /// The envelope's namespace or `ovf:version` names an OVF version nubis does not read.
    #[error("unknown OVF version: Envelope namespace {namespace:?}{}", version.as_ref().map(|v| format!(", ovf:version {v:?}")).unwrap_or_default())]
    UnknownVersion {
        /// The envelope's namespace URI.
        namespace: String,
        /// The `ovf:version` attribute, when it is the part that is not understood.
        version: Option<String>,
    },
    /// A section or element that must be understood (`ovf:required` absent or `true`) is not.
    #[error("{element} in {parent} is required but not understood by nubis (an extension that may be skipped says ovf:required=\"false\")")]
    RequiredSection {
        /// The element as written, with its namespace, e.g. `acme:TurboSection {urn:acme}`.
        element: String,
        /// The element containing it.
        parent: String,
    },
    /// A reference points at nothing: a file, disk, network, configuration or parent item that
    /// the envelope does not declare.
    #[error("{element} {attribute}={value:?} refers to nothing declared in the envelope")]
    DanglingReference {
        /// The referring element, e.g. `Disk "flash2"`.
        element: String,
        /// The attribute or child element holding the reference, e.g. `ovf:fileRef`.
        attribute: &'static str,
        /// The reference.
        value: String,
    },
    /// Two elements declare the same identifier.
    #[error("{element} {attribute}={value:?} is declared twice")]
    Duplicate {
        /// The element kind, e.g. `File`.
        element: String,
        /// The identifying attribute.
        attribute: &'static str,
        /// The repeated value.
        value: String,
    },
    /// A mandatory attribute or child element is absent.
    #[error("{element} has no {what}")]
    Missing {
        /// The element lacking it.
        element: String,
        /// What is missing, e.g. `ovf:href` or `VirtualQuantity`.
        what: &'static str,
    },
    /// A value cannot be used.
    #[error("{element} {attribute}={value:?}: {reason}")]
    InvalidValue {
        /// The element.
        element: String,
        /// The attribute or child element.
        attribute: &'static str,
        /// The value (truncated).
        value: String,
        /// Why it cannot be used.
        reason: &'static str,
    },
    /// The envelope uses an OVF feature nubis does not implement.
    #[error("{element}: {reason}")]
    Unsupported {
        /// The element.
        element: String,
        /// What is not supported, and what to do instead.
        reason: &'static str,
    },
    /// An element of nubis's own extension carries an attribute nubis does not define (a typo
    /// here would otherwise silently change what is monitored).
    #[error("{element} has unknown attribute {attribute:?}")]
    UnknownAttribute {
        /// The element.
        element: String,
        /// The attribute as written.
        attribute: String,
    },
    /// The requested deployment option is not declared.
    #[error("configuration {0:?} is not declared in the DeploymentOptionSection")]
    UnknownConfiguration(String),
    /// A password property carries a value, which would travel to every site on the chain.
    #[error("Property {key:?} is a password with a value; the descriptor is seen by every site on the VM's chain, so leave it empty and pass the secret to the guest another way")]
    SecretProperty {
        /// The property key.
        key: String,
    },
    /// The virtual system declares no vCPU or no memory, which a VM cannot run without.
    #[error("VirtualSystem {system:?} declares no {what}")]
    MissingHardware {
        /// The virtual system's id.
        system: String,
        /// `vCPU item (ResourceType 3)` or `memory item (ResourceType 4)`.
        what: &'static str,
    },
    /// The mapped descriptor breaks a rule of the descriptor itself.
    #[error("the mapped descriptor is invalid")]
    Descriptor(#[from] DescriptorError),
}

/// Truncates a value quoted in an error so a huge attribute cannot flood a log line.
pub(crate) fn clip(value: &str) -> String {
    const LIMIT: usize = 120;
    nubis_protocol::clip::clip_marked(value, LIMIT)
}
