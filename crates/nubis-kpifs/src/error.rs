//! Errors of the KPI filesystem: [`KpiError`] for the host agent's calls, [`Refusal`] for a write
//! that the filesystem refuses, together with the errno the writing application sees.

use std::io;
use std::path::PathBuf;

/// Why a host-agent call on the KPI filesystem or its database failed.
#[derive(Debug, thiserror::Error)]
pub enum KpiError {
    /// The mountpoint directory could not be created or inspected.
    #[error("cannot prepare mountpoint {path}")]
    Mountpoint {
        /// The mountpoint.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: io::Error,
    },
    /// The kernel (or `fusermount3`) refused the mount.
    #[error("cannot mount the kpi filesystem at {path}")]
    Mount {
        /// The mountpoint.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: io::Error,
    },
    /// The filesystem could not be unmounted cleanly.
    #[error("cannot unmount the kpi filesystem at {path}")]
    Unmount {
        /// The mountpoint.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: io::Error,
    },
    /// The directory that shares the filesystem with a guest could not be made or bound.
    #[error("cannot prepare the kpi export {path}")]
    Export {
        /// The export directory.
        path: PathBuf,
        /// What the operating system (or `mount`) said.
        #[source]
        source: io::Error,
    },
    /// The SQLite database failed.
    #[error("kpi database failure")]
    Database(#[from] rusqlite::Error),
    /// The database file holds something this crate does not understand.
    #[error("kpi database is inconsistent: {0}")]
    Corrupt(String),
    /// A write through [`crate::KpiStore::write`] was refused.
    #[error("kpi write refused")]
    Refused(#[from] Refusal),
}

/// Why a KPI write (or the file creation before it) is refused. Each refusal maps to the errno that
/// the writing application sees, see [`Refusal::errno`]; the database is left unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The file name is not a safe table name.
    #[error("name {0:?} is not a table name ([A-Za-z0-9_][A-Za-z0-9_-]{{0,63}})")]
    InvalidName(String),
    /// Creating one more table would exceed the configured table limit.
    #[error("table limit of {limit} reached")]
    TooManyTables {
        /// The configured maximum.
        limit: usize,
    },
    /// The content is larger than the configured file size limit.
    #[error("file larger than {limit} bytes")]
    TooLarge {
        /// The configured maximum in bytes.
        limit: usize,
    },
    /// An unencrypted report has more than two lines.
    #[error("more than two lines")]
    TooManyLines,
    /// An unencrypted report is not UTF-8.
    #[error("not valid utf-8")]
    NotUtf8,
    /// The header and the values line have different numbers of fields.
    #[error("header has {header} fields, values line has {values}")]
    Ragged {
        /// Fields in the header line.
        header: usize,
        /// Fields in the values line.
        values: usize,
    },
    /// An unencrypted report holds no values line.
    #[error("no values line")]
    Empty,
    /// A header field is not a safe column name.
    #[error("column name {0:?} is not [A-Za-z_][A-Za-z0-9_]{{0,63}}")]
    InvalidColumnName(String),
    /// A header field uses a name the database reserves for itself.
    #[error("column name {0:?} is reserved")]
    ReservedColumn(String),
    /// Two header fields name the same column (SQLite compares names without case).
    #[error("column {0:?} appears twice")]
    DuplicateColumn(String),
    /// The report, or the table after adding its new columns, has too many columns.
    #[error("more than {limit} columns")]
    TooManyColumns {
        /// The configured maximum.
        limit: usize,
    },
    /// A quoted CSV field is not closed, or text follows its closing quote.
    #[error("bad quoting in field {field}")]
    BadQuote {
        /// One-based field position.
        field: usize,
    },
    /// The file was opened for appending; a KPI report replaces the previous one instead.
    #[error("appending is not supported")]
    Append,
    /// Removing, renaming, linking and making directories are not part of the KPI filesystem.
    #[error("operation not permitted on the kpi filesystem")]
    NotPermitted,
}

impl Refusal {
    /// The errno returned to the application for this refusal.
    ///
    /// | refusal | errno |
    /// |---|---|
    /// | `InvalidName`, `TooManyLines`, `NotUtf8`, `Ragged`, `Empty`, column and quoting errors, `Append` | `EINVAL` |
    /// | `TooManyTables` | `ENOSPC` |
    /// | `TooLarge` | `EFBIG` |
    /// | `NotPermitted` | `EPERM` |
    pub fn errno(&self) -> i32 {
        match self {
            Refusal::TooManyTables { .. } => libc::ENOSPC,
            Refusal::TooLarge { .. } => libc::EFBIG,
            Refusal::NotPermitted => libc::EPERM,
            Refusal::InvalidName(_)
            | Refusal::TooManyLines
            | Refusal::NotUtf8
            | Refusal::Ragged { .. }
            | Refusal::Empty
            | Refusal::InvalidColumnName(_)
            | Refusal::ReservedColumn(_)
            | Refusal::DuplicateColumn(_)
            | Refusal::TooManyColumns { .. }
            | Refusal::BadQuote { .. }
            | Refusal::Append => libc::EINVAL,
        }
    }
}
