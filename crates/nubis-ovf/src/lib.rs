//! VM descriptors from OVF packages (DMTF DSP0243) and from a TOML form.
//!
//! The paper builds on OVF: a VM arrives at its primary site as an OVF envelope, and the
//! federation carries the part of it that placement, migration and monitoring need — the
//! [`VmDescriptor`](nubis_protocol::descriptor::VmDescriptor). This crate reads the envelope
//! ([`OvfPackage::parse`]) into a [`VmTemplate`], which becomes a descriptor once the deploying
//! site assigns the VM id, the primary site and its keys ([`OvfPackage::into_descriptor`]).
//!
//! What is read:
//!
//! - OVF 1.x (`http://schemas.dmtf.org/ovf/envelope/1`) and 2.x (`…/envelope/2`), with prefixes
//!   or a default namespace, and the pre-standard 0.9 namespace
//!   (`http://www.vmware.com/schema/ovf/1/envelope`), whose `Section xsi:type="…_Type"` form is
//!   read as the 1.x sections. Any other envelope namespace (e.g. `…/envelope/3`) is refused
//!   with [`OvfError::UnknownVersion`].
//! - One `VirtualSystem`: vCPUs (ResourceType 3), memory (4, with its `AllocationUnits`), disk
//!   drives (17, through `DiskSection` and `References`), Ethernet adapters (10, through
//!   `NetworkSection`), `ProductSection` properties, the name, and the deployment option chosen
//!   in [`ParseOptions`] (default: the one marked default).
//! - nubis's monitoring extension, which carries the paper's monitoring specifiers:
//!
//! ```xml
//! <Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"
//!           xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
//!           xmlns:nubis="urn:nubis:ovf:monitoring:1">
//!   …
//!   <VirtualSystem ovf:id="web">
//!     …
//!     <nubis:MonitoringSection ovf:required="false">
//!       <Info>What the federation measures and delivers for this VM</Info>
//!       <nubis:Specifier dataPoint="cpu.utilisation" monitoringIntervalMs="1000"
//!                        deliveryIntervalMs="10000" format="median"/>
//!       <nubis:Specifier dataPoint="kpi.web.current_users" monitoringIntervalMs="0"
//!                        predicate="gt:1000" sealed="true"/>
//!     </nubis:MonitoringSection>
//!   </VirtualSystem>
//! </Envelope>
//! ```
//!
//! The section is marked `ovf:required="false"` so that other OVF tools deploy the package and
//! skip it; nubis always reads it. `format` is `raw` (default), `min`, `max`, `mean` or
//! `median`; `deliveryIntervalMs` defaults to 0 (as soon as available); `predicate` is
//! `<lt|le|gt|ge|eq|ne>:<number>`; `sealed` defaults to `false`. Unknown attributes are refused.
//!
//! What is refused, with an error naming the element: unknown OVF versions; sections or items
//! that are required (no `ovf:required="false"`) and not understood, such as a vendor extension
//! section or an `InstallSection`; references to files, disks, networks, configurations or
//! parent items that are not declared; password properties that carry a value (the descriptor
//! travels to every site on the VM's chain); virtual system collections.
//!
//! The TOML form ([`descriptor_from_toml`], [`VmTemplate::from_toml`]) describes the same VM
//! without OVF. The full mapping table is in this crate's `README.md`.

mod error;
mod ovf;
mod spec;
mod template;
mod toml_form;
mod units;
mod xml;

pub use error::OvfError;
pub use ovf::{
    network_token, parse_ovf, DiskFile, Ignored, OvfPackage, OvfVersion, ParseOptions,
    NUBIS_MONITORING_NS, OVF_0_9_NS, OVF_1_NS, OVF_2_NS,
};
pub use spec::{format_text, parse_format, parse_predicate};
pub use template::{VmTemplate, FIRST_DESCRIPTOR_VERSION};
pub use toml_form::{descriptor_from_toml, TomlError};
pub use units::byte_multiplier;
pub use xml::{XmlError, MAX_DEPTH, MAX_DOCUMENT_LEN};
