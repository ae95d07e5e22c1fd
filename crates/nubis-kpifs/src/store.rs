//! The database back end of the KPI filesystem: one SQLite file per VM, one table per KPI file,
//! and a global log that orders every row so a producer can resume publishing after a restart.
//!
//! Schema (all names quoted, so the `/` in a table name is harmless):
//!
//! - `"unencrypted/<file>"(kpi_id INTEGER PRIMARY KEY, ts_ms INTEGER NOT NULL, <column> ...)` —
//!   one row per accepted report; columns are untyped so each value keeps SQLite's natural type.
//! - `"encrypted/<file>"(kpi_id INTEGER PRIMARY KEY, ts_ms INTEGER NOT NULL, blob BLOB NOT NULL)`.
//! - `kpi_log(id INTEGER PRIMARY KEY AUTOINCREMENT, dir, name, ts_ms, columns)` — the global,
//!   never reused row id shared with the per-file table (`kpi_id`), and the column names of that
//!   write in order, so a resumed row equals the event sent when it was written.
//! - `kpi_tables(dir, name, created_ms, last_ts_ms, last_content)` — the catalog: which files
//!   exist, and the exact bytes that `cat` returns.
//! - `kpi_meta(key, value)` — the `published` high-water mark.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::types::ValueRef;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use tracing::debug;

use crate::error::{KpiError, Refusal};
use crate::report::{parse_report, validate_table_name, KpiValue};
use crate::KpiOptions;

/// The two directories of the paper's KPI filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KpiDir {
    /// Files parsed as one- or two-line CSV reports.
    Unencrypted,
    /// Files stored whole as opaque blobs (sealed by the application for the primary site).
    Encrypted,
}

impl KpiDir {
    /// The directory name in the mount, also the prefix of the SQL table name.
    pub fn as_str(self) -> &'static str {
        match self {
            KpiDir::Unencrypted => "unencrypted",
            KpiDir::Encrypted => "encrypted",
        }
    }

    fn parse(s: &str) -> Option<KpiDir> {
        match s {
            "unencrypted" => Some(KpiDir::Unencrypted),
            "encrypted" => Some(KpiDir::Encrypted),
            _ => None,
        }
    }

    /// The quoted SQL identifier of a file's table, e.g. `"unencrypted/load"`.
    fn sql_table(self, name: &str) -> String {
        format!("\"{}/{}\"", self.as_str(), name)
    }
}

/// What a KPI row holds.
#[derive(Debug, Clone, PartialEq)]
pub enum KpiRowKind {
    /// A parsed report: column names and values in the order written.
    Unencrypted {
        /// Column name and value pairs.
        columns: Vec<(String, KpiValue)>,
    },
    /// An opaque blob, stored and delivered as written.
    Encrypted {
        /// The bytes the application wrote.
        blob: Vec<u8>,
    },
}

/// One committed KPI row, as sent to the producer and as read back for resuming.
#[derive(Debug, Clone, PartialEq)]
pub struct KpiRow {
    /// Global, monotonic row id across all tables (`kpi_log.id`).
    pub rowid: i64,
    /// The file name, which is also the table name within its directory.
    pub table: String,
    /// The row's content.
    pub kind: KpiRowKind,
    /// When the write was committed, in milliseconds since the Unix epoch.
    pub ts_ms: i64,
}

impl KpiRow {
    /// The directory the row was written in.
    pub fn dir(&self) -> KpiDir {
        match self.kind {
            KpiRowKind::Unencrypted { .. } => KpiDir::Unencrypted,
            KpiRowKind::Encrypted { .. } => KpiDir::Encrypted,
        }
    }
}

/// A catalog entry: one file of the KPI filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KpiTable {
    /// Its directory.
    pub dir: KpiDir,
    /// Its file (and table) name.
    pub name: String,
    /// When it was created, in milliseconds since the Unix epoch.
    pub created_ms: i64,
    /// When its last row was written, if any.
    pub last_ts_ms: Option<i64>,
    /// The content of its last accepted write (what `cat` returns).
    pub last_content: Vec<u8>,
}

/// How hard a commit presses data to disk before `close()` returns to the writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// `synchronous=FULL`: the WAL is fsynced at each commit, so a write whose `close()` returned
    /// success survives a host power loss, not only a crash of the host agent.
    #[default]
    Full,
    /// `synchronous=NORMAL`: a commit survives the host agent being killed, but the last commits
    /// may be lost if the host itself loses power. Several times faster per write.
    Normal,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS kpi_tables(
    dir TEXT NOT NULL CHECK (dir IN ('unencrypted', 'encrypted')),
    name TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    last_ts_ms INTEGER,
    last_content BLOB NOT NULL DEFAULT x'',
    PRIMARY KEY (dir, name)
);
CREATE TABLE IF NOT EXISTS kpi_log(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    dir TEXT NOT NULL,
    name TEXT NOT NULL,
    ts_ms INTEGER NOT NULL,
    columns TEXT
);
CREATE TABLE IF NOT EXISTS kpi_meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO kpi_meta(key, value) VALUES ('published', 0);
";

/// The SQLite database behind one KPI filesystem. The mounted filesystem owns one; the host agent
/// may open another on the same file (WAL lets readers and one writer proceed side by side).
#[derive(Debug)]
pub struct KpiStore {
    conn: Connection,
    max_file_size: usize,
    max_tables: usize,
    max_columns: usize,
    /// Lower-cased column names of each unencrypted table, `None` for encrypted tables.
    tables: HashMap<(KpiDir, String), Option<HashSet<String>>>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn value_of(v: ValueRef<'_>) -> KpiValue {
    match v {
        ValueRef::Null => KpiValue::Null,
        ValueRef::Integer(i) => KpiValue::Integer(i),
        ValueRef::Real(f) => KpiValue::Real(f),
        ValueRef::Text(t) | ValueRef::Blob(t) => {
            KpiValue::Text(String::from_utf8_lossy(t).into_owned())
        }
    }
}

impl KpiStore {
    /// Opens (creating if needed) the database at `path`, in WAL mode with the durability and
    /// limits of `options`.
    pub fn open(path: &Path, options: &KpiOptions) -> Result<KpiStore, KpiError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(KpiError::Corrupt(format!(
                "journal mode is {mode}, not wal"
            )));
        }
        let sync = match options.durability {
            Durability::Full => "FULL",
            Durability::Normal => "NORMAL",
        };
        conn.execute_batch(&format!("PRAGMA synchronous={sync};"))?;
        conn.execute_batch(SCHEMA)?;
        let mut store = KpiStore {
            conn,
            max_file_size: options.max_file_size,
            max_tables: options.max_tables,
            max_columns: options.max_columns,
            tables: HashMap::new(),
        };
        store.load_catalog()?;
        Ok(store)
    }

    fn load_catalog(&mut self) -> Result<(), KpiError> {
        let mut tables = HashMap::new();
        for t in self.tables()? {
            let columns = match t.dir {
                KpiDir::Unencrypted => Some(self.columns_of(t.dir, &t.name)?),
                KpiDir::Encrypted => None,
            };
            tables.insert((t.dir, t.name), columns);
        }
        self.tables = tables;
        Ok(())
    }

    fn columns_of(&self, dir: KpiDir, name: &str) -> Result<HashSet<String>, KpiError> {
        let mut stmt = self
            .conn
            .prepare(&format!("PRAGMA table_info({})", dir.sql_table(name)))?;
        let names = stmt
            .query_map([], |r| r.get::<_, String>(1))?
            .collect::<Result<Vec<_>, _>>()?;
        if names.is_empty() {
            return Err(KpiError::Corrupt(format!(
                "catalog names {}/{name} but the table is missing",
                dir.as_str()
            )));
        }
        Ok(names.into_iter().map(|n| n.to_ascii_lowercase()).collect())
    }

    /// All files, read from the database (so rows written by another connection are seen).
    pub fn tables(&self) -> Result<Vec<KpiTable>, KpiError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT dir, name, created_ms, last_ts_ms, last_content FROM kpi_tables ORDER BY dir, name",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, Option<i64>>(3)?,
                r.get::<_, Vec<u8>>(4)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (dir, name, created_ms, last_ts_ms, last_content) = row?;
            let dir = KpiDir::parse(&dir)
                .ok_or_else(|| KpiError::Corrupt(format!("unknown directory {dir:?}")))?;
            out.push(KpiTable {
                dir,
                name,
                created_ms,
                last_ts_ms,
                last_content,
            });
        }
        Ok(out)
    }

    /// Whether a file exists.
    pub fn has_table(&self, dir: KpiDir, name: &str) -> bool {
        self.tables.contains_key(&(dir, name.to_owned()))
    }

    /// Number of files in both directories.
    pub fn table_count(&self) -> usize {
        self.tables.len()
    }

    /// Creates an empty file (table). Returns `false` if it already existed.
    pub fn create_table(&mut self, dir: KpiDir, name: &str) -> Result<bool, KpiError> {
        validate_table_name(name)?;
        if self.has_table(dir, name) {
            return Ok(false);
        }
        if self.tables.len() >= self.max_tables {
            return Err(Refusal::TooManyTables {
                limit: self.max_tables,
            }
            .into());
        }
        let body = match dir {
            KpiDir::Unencrypted => "kpi_id INTEGER PRIMARY KEY, ts_ms INTEGER NOT NULL",
            KpiDir::Encrypted => {
                "kpi_id INTEGER PRIMARY KEY, ts_ms INTEGER NOT NULL, blob BLOB NOT NULL"
            }
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT INTO kpi_tables(dir, name, created_ms) VALUES (?1, ?2, ?3)",
            params![dir.as_str(), name, now_ms()],
        )?;
        tx.execute_batch(&format!("CREATE TABLE {}({body});", dir.sql_table(name)))?;
        tx.commit()?;
        let columns = match dir {
            KpiDir::Unencrypted => {
                Some(["kpi_id", "ts_ms"].into_iter().map(str::to_owned).collect())
            }
            KpiDir::Encrypted => None,
        };
        self.tables.insert((dir, name.to_owned()), columns);
        debug!(dir = dir.as_str(), table = name, "kpi table created");
        Ok(true)
    }

    /// Stores one complete write of a file as a row, creating the file if needed. Unencrypted
    /// content is parsed as a report; encrypted content is stored untouched. Either the whole row
    /// (and any new columns) is committed, or nothing changes.
    pub fn write(&mut self, dir: KpiDir, name: &str, content: &[u8]) -> Result<KpiRow, KpiError> {
        if content.len() > self.max_file_size {
            return Err(Refusal::TooLarge {
                limit: self.max_file_size,
            }
            .into());
        }
        validate_table_name(name)?;
        let parsed = match dir {
            KpiDir::Unencrypted => Some(parse_report(content, self.max_columns)?),
            KpiDir::Encrypted => None,
        };
        self.create_table(dir, name)?;
        match parsed {
            Some(columns) => self.insert_unencrypted(name, columns, content),
            None => self.insert_encrypted(name, content),
        }
    }

    fn insert_unencrypted(
        &mut self,
        name: &str,
        columns: Vec<(String, KpiValue)>,
        content: &[u8],
    ) -> Result<KpiRow, KpiError> {
        let dir = KpiDir::Unencrypted;
        let known = self
            .tables
            .get(&(dir, name.to_owned()))
            .and_then(|c| c.as_ref())
            .ok_or_else(|| KpiError::Corrupt(format!("no column list for {name}")))?;
        let added: Vec<&str> = columns
            .iter()
            .map(|(c, _)| c.as_str())
            .filter(|c| !known.contains(&c.to_ascii_lowercase()))
            .collect();
        // The two bookkeeping columns do not count against the limit.
        if known.len() - 2 + added.len() > self.max_columns {
            return Err(Refusal::TooManyColumns {
                limit: self.max_columns,
            }
            .into());
        }
        let table = dir.sql_table(name);
        let ts_ms = now_ms();
        let names: Vec<&str> = columns.iter().map(|(c, _)| c.as_str()).collect();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        for c in &added {
            tx.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN \"{c}\";"))?;
        }
        tx.prepare_cached(
            "INSERT INTO kpi_log(dir, name, ts_ms, columns) VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![dir.as_str(), name, ts_ms, names.join(",")])?;
        let rowid = tx.last_insert_rowid();
        let mut sql = format!("INSERT INTO {table}(kpi_id, ts_ms");
        for c in &names {
            sql.push_str(&format!(", \"{c}\""));
        }
        sql.push_str(") VALUES (?, ?");
        sql.push_str(&", ?".repeat(names.len()));
        sql.push(')');
        {
            let mut stmt = tx.prepare_cached(&sql)?;
            let mut values: Vec<rusqlite::types::Value> = vec![rowid.into(), ts_ms.into()];
            for (_, v) in &columns {
                values.push(match v {
                    KpiValue::Null => rusqlite::types::Value::Null,
                    KpiValue::Integer(i) => (*i).into(),
                    KpiValue::Real(f) => (*f).into(),
                    KpiValue::Text(t) => t.clone().into(),
                });
            }
            stmt.execute(rusqlite::params_from_iter(values))?;
        }
        tx.prepare_cached(
            "UPDATE kpi_tables SET last_ts_ms = ?3, last_content = ?4 WHERE dir = ?1 AND name = ?2",
        )?
        .execute(params![dir.as_str(), name, ts_ms, content])?;
        tx.commit()?;
        if !added.is_empty() {
            if let Some(Some(set)) = self.tables.get_mut(&(dir, name.to_owned())) {
                set.extend(added.iter().map(|c| c.to_ascii_lowercase()));
            }
            debug!(table = name, columns = ?added, "kpi columns added");
        }
        Ok(KpiRow {
            rowid,
            table: name.to_owned(),
            kind: KpiRowKind::Unencrypted { columns },
            ts_ms,
        })
    }

    fn insert_encrypted(&mut self, name: &str, content: &[u8]) -> Result<KpiRow, KpiError> {
        let dir = KpiDir::Encrypted;
        let ts_ms = now_ms();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.prepare_cached(
            "INSERT INTO kpi_log(dir, name, ts_ms, columns) VALUES (?1, ?2, ?3, NULL)",
        )?
        .execute(params![dir.as_str(), name, ts_ms])?;
        let rowid = tx.last_insert_rowid();
        tx.prepare_cached(&format!(
            "INSERT INTO {}(kpi_id, ts_ms, blob) VALUES (?1, ?2, ?3)",
            dir.sql_table(name)
        ))?
        .execute(params![rowid, ts_ms, content])?;
        tx.prepare_cached(
            "UPDATE kpi_tables SET last_ts_ms = ?3, last_content = ?4 WHERE dir = ?1 AND name = ?2",
        )?
        .execute(params![dir.as_str(), name, ts_ms, content])?;
        tx.commit()?;
        Ok(KpiRow {
            rowid,
            table: name.to_owned(),
            kind: KpiRowKind::Encrypted {
                blob: content.to_vec(),
            },
            ts_ms,
        })
    }

    /// Rows with a global id above `after`, oldest first, at most `limit` of them.
    pub fn rows_after(&self, after: i64, limit: usize) -> Result<Vec<KpiRow>, KpiError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, dir, name, ts_ms, columns FROM kpi_log WHERE id > ?1 ORDER BY id LIMIT ?2",
        )?;
        let log = stmt
            .query_map(params![after, limit], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, Option<String>>(4)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        let mut out = Vec::with_capacity(log.len());
        for (rowid, dir, name, ts_ms, columns) in log {
            let dir = KpiDir::parse(&dir)
                .ok_or_else(|| KpiError::Corrupt(format!("unknown directory {dir:?}")))?;
            let table = dir.sql_table(&name);
            let kind = match dir {
                KpiDir::Encrypted => {
                    let blob: Vec<u8> = self
                        .conn
                        .prepare_cached(&format!("SELECT blob FROM {table} WHERE kpi_id = ?1"))?
                        .query_row([rowid], |r| r.get(0))
                        .optional()?
                        .ok_or_else(|| KpiError::Corrupt(format!("row {rowid} missing")))?;
                    KpiRowKind::Encrypted { blob }
                }
                KpiDir::Unencrypted => {
                    let names: Vec<String> = columns
                        .unwrap_or_default()
                        .split(',')
                        .filter(|c| !c.is_empty())
                        .map(str::to_owned)
                        .collect();
                    let select: Vec<String> = names.iter().map(|c| format!("\"{c}\"")).collect();
                    let sql = format!(
                        "SELECT {} FROM {table} WHERE kpi_id = ?1",
                        if select.is_empty() {
                            "NULL".to_owned()
                        } else {
                            select.join(", ")
                        }
                    );
                    let values = self
                        .conn
                        .prepare_cached(&sql)?
                        .query_row([rowid], |r| {
                            (0..names.len())
                                .map(|i| r.get_ref(i).map(value_of))
                                .collect::<Result<Vec<_>, _>>()
                        })
                        .optional()?
                        .ok_or_else(|| KpiError::Corrupt(format!("row {rowid} missing")))?;
                    KpiRowKind::Unencrypted {
                        columns: names.into_iter().zip(values).collect(),
                    }
                }
            };
            out.push(KpiRow {
                rowid,
                table: name,
                kind,
                ts_ms,
            });
        }
        Ok(out)
    }

    /// The `published` high-water mark: every row up to this id has been published.
    pub fn published(&self) -> Result<i64, KpiError> {
        Ok(self.conn.query_row(
            "SELECT value FROM kpi_meta WHERE key = 'published'",
            [],
            |r| r.get(0),
        )?)
    }

    /// Records that every row up to `rowid` has been published. The mark never moves back and
    /// never passes the newest row; the new mark is returned.
    pub fn mark_published(&mut self, rowid: i64) -> Result<i64, KpiError> {
        self.conn.execute(
            "UPDATE kpi_meta SET value = max(value, min(?1, (SELECT coalesce(max(id), 0) FROM kpi_log)))
             WHERE key = 'published'",
            [rowid],
        )?;
        self.published()
    }

    /// Rows not yet marked published, oldest first, at most `limit` of them.
    pub fn unpublished_rows(&self, limit: usize) -> Result<Vec<KpiRow>, KpiError> {
        self.rows_after(self.published()?, limit)
    }

    /// Number of rows in one file's table.
    pub fn row_count(&self, dir: KpiDir, name: &str) -> Result<u64, KpiError> {
        validate_table_name(name)?;
        let n: i64 = self.conn.query_row(
            &format!("SELECT count(*) FROM {}", dir.sql_table(name)),
            [],
            |r| r.get(0),
        )?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Runs SQLite's `PRAGMA integrity_check` and checks that every log entry has its row.
    pub fn check_consistency(&self) -> Result<(), KpiError> {
        let verdict: String = self
            .conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
        if verdict != "ok" {
            return Err(KpiError::Corrupt(verdict));
        }
        let logged: i64 = self
            .conn
            .query_row("SELECT count(*) FROM kpi_log", [], |r| r.get(0))?;
        let mut stored = 0i64;
        for t in self.tables()? {
            stored += self.conn.query_row(
                &format!("SELECT count(*) FROM {}", t.dir.sql_table(&t.name)),
                [],
                |r| r.get::<_, i64>(0),
            )?;
        }
        if logged != stored {
            return Err(KpiError::Corrupt(format!(
                "{logged} log entries but {stored} rows"
            )));
        }
        Ok(())
    }
}
