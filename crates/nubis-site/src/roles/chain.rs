//! Operations along a VM's chain of responsibility: eviction notices from the downstream site
//! (Forced migration up the chain) and the Control interface, forwarded down the chain to the
//! host that runs the VM.

use nubis_protocol::descriptor::VmDescriptor;
use nubis_protocol::message::{
    ControlChange, ControlReply, ControlRequest, ErrorCode, ErrorReply, EvictionAccepted,
    EvictionNotice,
};
use nubis_protocol::subject::FederationOp;
use nubis_protocol::SiteId;

use crate::journal::{NextHop, VmRecord};
use crate::local::LocalSite;
use crate::peers::Peers;

use super::{internal, Roles};

/// Checks that a descriptor update keeps what identifies the VM: its id (the host applies the
/// new descriptor to the VM it names), its primary site and the primary's keys. Even the VM's
/// upstream may change only the VM, never turn the record into one of another VM or primary.
pub(crate) fn check_update(record: &VmRecord, descriptor: &VmDescriptor) -> Result<(), ErrorReply> {
    if descriptor.id != record.vm {
        return Err(ErrorReply::new(
            ErrorCode::Malformed,
            "descriptor id differs from the VM id",
        ));
    }
    if descriptor.primary_site != record.primary
        || descriptor.primary_keys != record.descriptor.primary_keys
    {
        return Err(ErrorReply::new(
            ErrorCode::Conflict,
            "a descriptor update cannot change the VM's primary or its keys",
        ));
    }
    Ok(())
}

impl<L: LocalSite, P: Peers> Roles<L, P> {
    /// Eviction notice from the downstream site (Forced migration up the chain): accepted and
    /// acted upon by starting a migration with this site as Controller.
    pub async fn eviction(
        &self,
        from: &SiteId,
        notice: EvictionNotice,
    ) -> Result<EvictionAccepted, ErrorReply> {
        let record = self.vm_record(&notice.vm)?;
        if record.downstream != Some(NextHop::Site(from.clone())) {
            return Err(ErrorReply::new(
                ErrorCode::Refused,
                format!("VM {} is not delegated to site {from}", notice.vm),
            ));
        }
        self.journal
            .put_eviction_bounded(&notice, from)
            .map_err(crate::journal::refusal)?;
        Ok(EvictionAccepted {
            notice_id: notice.notice_id,
            vm: notice.vm,
        })
    }

    /// The Control interface, forwarded down the chain to the host that runs the VM.
    pub async fn control(
        &self,
        from: &SiteId,
        req: ControlRequest,
    ) -> Result<ControlReply, ErrorReply> {
        let mut record = self.vm_record(&req.vm)?;
        self.check_upstream(from, &record)?;
        if let ControlChange::UpdateDescriptor { descriptor } = &req.change {
            check_update(&record, descriptor)?;
        }
        let Some(next) = &record.downstream else {
            return Err(ErrorReply::new(ErrorCode::UnknownVm, "VM is not placed"));
        };
        let (r, descriptor) = (&req, &record.descriptor);
        let reply = self
            .forward(next, FederationOp::VmControl, r, move |h| async move {
                self.local.control(descriptor, &h, &r.change).await
            })
            .await?;
        // Every site on the chain keeps the current descriptor.
        match &req.change {
            ControlChange::UpdateDescriptor { descriptor } => {
                record.descriptor = (**descriptor).clone();
                self.journal.put_vm(&record).map_err(internal)?;
            }
            ControlChange::SetMonitoring { monitoring } => {
                record.descriptor.monitoring = monitoring.clone();
                record.descriptor.version =
                    reply.descriptor_version.max(record.descriptor.version + 1);
                self.journal.put_vm(&record).map_err(internal)?;
            }
            _ => {}
        }
        Ok(reply)
    }
}
