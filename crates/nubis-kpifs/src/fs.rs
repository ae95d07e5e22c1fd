//! The FUSE side of the KPI filesystem: inodes for the two directories and their files, one
//! write session per open file handle, and the commit of a session into [`KpiStore`] when the
//! writer closes (flush) or syncs the file.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use tokio::sync::mpsc;
use tracing::{debug, error, warn};

use crate::error::{KpiError, Refusal};
use crate::report::{precheck_partial, validate_table_name, MAX_NAME_LEN};
use crate::store::{KpiDir, KpiRow, KpiStore};

const ROOT: u64 = 1;
const UNENCRYPTED: u64 = 2;
const ENCRYPTED: u64 = 3;
const FIRST_FILE: u64 = 4;

/// Names never disappear (files cannot be removed), so the kernel may keep them long.
const ENTRY_TTL: Duration = Duration::from_secs(60);
/// File sizes change with every commit, so the kernel must ask each time.
const FILE_ATTR_TTL: Duration = Duration::ZERO;
const DIR_ATTR_TTL: Duration = Duration::from_secs(1);

/// A file of the mount: the last committed content is what readers see.
#[derive(Debug)]
struct Node {
    dir: KpiDir,
    name: String,
    content: Arc<Vec<u8>>,
    mtime: SystemTime,
}

/// The bytes written through one open file handle since it was opened. Every session starts
/// empty: a KPI report replaces the previous one, with or without `O_TRUNC`.
#[derive(Debug)]
struct WriteSession {
    ino: u64,
    buf: Vec<u8>,
    readable: bool,
    /// Written since the last commit.
    dirty: bool,
    /// Lock owners (one per process: the kernel derives it from the open-file table, which threads
    /// share and a forked child does not) that wrote to this session.
    writers: Vec<u64>,
    /// A write arrived without a lock owner, so any flush commits.
    anonymous_writer: bool,
    /// Set once the session was refused; every later write and flush reports this errno, and
    /// nothing of the session is committed.
    failed: Option<i32>,
}

#[derive(Debug)]
enum Handle {
    Read { content: Arc<Vec<u8>> },
    Write(WriteSession),
}

/// Everything the filesystem and the host agent's handle share, behind one lock.
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) store: KpiStore,
    nodes: HashMap<u64, Node>,
    by_name: HashMap<(KpiDir, String), u64>,
    next_ino: u64,
    handles: HashMap<u64, Handle>,
    next_fh: u64,
}

impl State {
    pub(crate) fn new(store: KpiStore) -> Result<State, KpiError> {
        let mut state = State {
            store,
            nodes: HashMap::new(),
            by_name: HashMap::new(),
            next_ino: FIRST_FILE,
            handles: HashMap::new(),
            next_fh: 1,
        };
        for t in state.store.tables()? {
            let mtime = UNIX_EPOCH
                + Duration::from_millis(
                    u64::try_from(t.last_ts_ms.unwrap_or(t.created_ms)).unwrap_or(0),
                );
            state.add_node(t.dir, t.name, Arc::new(t.last_content), mtime);
        }
        Ok(state)
    }

    fn add_node(
        &mut self,
        dir: KpiDir,
        name: String,
        content: Arc<Vec<u8>>,
        mtime: SystemTime,
    ) -> u64 {
        let ino = self.next_ino;
        self.next_ino += 1;
        self.by_name.insert((dir, name.clone()), ino);
        self.nodes.insert(
            ino,
            Node {
                dir,
                name,
                content,
                mtime,
            },
        );
        ino
    }

    fn new_handle(&mut self, handle: Handle) -> u64 {
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(fh, handle);
        fh
    }
}

/// Locks the shared state; a panic in another holder does not make the data unusable, since every
/// change to it is a single assignment or a committed transaction.
pub(crate) fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn dir_of(ino: u64) -> Option<KpiDir> {
    match ino {
        UNENCRYPTED => Some(KpiDir::Unencrypted),
        ENCRYPTED => Some(KpiDir::Encrypted),
        _ => None,
    }
}

fn errno(code: i32) -> Errno {
    Errno::from_i32(code)
}

pub(crate) struct KpiFilesystem {
    pub(crate) state: Arc<Mutex<State>>,
    pub(crate) events: mpsc::Sender<KpiRow>,
    pub(crate) dropped: Arc<AtomicU64>,
    pub(crate) max_file_size: usize,
    pub(crate) max_tables: usize,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) started: SystemTime,
}

impl KpiFilesystem {
    fn dir_attr(&self, ino: u64) -> FileAttr {
        FileAttr {
            ino: INodeNo(ino),
            size: 0,
            blocks: 0,
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind: FileType::Directory,
            perm: 0o755,
            nlink: 2,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn file_attr(&self, ino: u64, node: &Node, size: usize) -> FileAttr {
        let size = u64::try_from(size).unwrap_or(u64::MAX);
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: node.mtime,
            mtime: node.mtime,
            ctime: node.mtime,
            crtime: node.mtime,
            kind: FileType::RegularFile,
            perm: 0o644,
            nlink: 1,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn attr_of(&self, state: &State, ino: u64) -> Option<(FileAttr, Duration)> {
        match ino {
            ROOT | UNENCRYPTED | ENCRYPTED => Some((self.dir_attr(ino), DIR_ATTR_TTL)),
            _ => state
                .nodes
                .get(&ino)
                .map(|n| (self.file_attr(ino, n, n.content.len()), FILE_ATTR_TTL)),
        }
    }

    /// Commits the session's bytes as one row if anything was written since the last commit.
    /// Returns the errno for the writer, and the row to announce once the lock is released.
    ///
    /// With `closer` set (a flush), only a process that wrote to the session commits it: a
    /// forked child that inherited the descriptor and closes it (for instance at `exec`) must
    /// not commit a report its parent is still writing.
    fn commit(
        &self,
        state: &mut State,
        fh: u64,
        closer: Option<u64>,
    ) -> Result<Option<KpiRow>, i32> {
        let Some(Handle::Write(session)) = state.handles.get_mut(&fh) else {
            return Ok(None);
        };
        if let Some(code) = session.failed {
            return Err(code);
        }
        if !session.dirty {
            return Ok(None);
        }
        if let Some(owner) = closer {
            if !session.anonymous_writer && !session.writers.contains(&owner) {
                return Ok(None);
            }
        }
        session.dirty = false;
        let ino = session.ino;
        let content = session.buf.clone();
        let Some(node) = state.nodes.get(&ino) else {
            return Err(libc::EIO);
        };
        let (dir, name) = (node.dir, node.name.clone());
        match state.store.write(dir, &name, &content) {
            Ok(row) => {
                if let Some(node) = state.nodes.get_mut(&ino) {
                    node.content = Arc::new(content);
                    node.mtime = SystemTime::now();
                }
                debug!(dir = dir.as_str(), table = %name, rowid = row.rowid, "kpi row committed");
                Ok(Some(row))
            }
            Err(e) => {
                let code = match &e {
                    KpiError::Refused(r) => {
                        warn!(dir = dir.as_str(), table = %name, reason = %r, "kpi write refused");
                        r.errno()
                    }
                    other => {
                        error!(dir = dir.as_str(), table = %name, error = %other, "kpi commit failed");
                        libc::EIO
                    }
                };
                if let Some(Handle::Write(s)) = state.handles.get_mut(&fh) {
                    s.failed = Some(code);
                }
                Err(code)
            }
        }
    }

    fn announce(&self, row: Option<KpiRow>) {
        let Some(row) = row else { return };
        match self.events.try_send(row) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(row)) => {
                // The row is committed; a consumer that falls behind catches up from the database.
                self.dropped.fetch_add(1, Ordering::Relaxed);
                debug!(rowid = row.rowid, "kpi event channel full, event dropped");
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    fn commit_and_reply(&self, fh: FileHandle, closer: Option<u64>, reply: ReplyEmpty) {
        let result = {
            let mut state = lock(&self.state);
            self.commit(&mut state, fh.0, closer)
        };
        match result {
            Ok(row) => {
                self.announce(row);
                reply.ok();
            }
            Err(code) => reply.error(errno(code)),
        }
    }

    fn refuse_open(flags: i32) -> Option<Refusal> {
        let writes = flags & libc::O_ACCMODE != libc::O_RDONLY;
        (writes && flags & libc::O_APPEND != 0).then_some(Refusal::Append)
    }
}

impl Filesystem for KpiFilesystem {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // With atomic O_TRUNC the kernel passes O_TRUNC to open instead of sending a separate
        // truncate, which saves a round trip per report.
        if let Err(missing) = config.add_capabilities(InitFlags::FUSE_ATOMIC_O_TRUNC) {
            debug!(?missing, "kernel lacks atomic O_TRUNC");
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let state = lock(&self.state);
        let found = match (parent.0, name.to_str()) {
            (ROOT, Some("unencrypted")) => Some(UNENCRYPTED),
            (ROOT, Some("encrypted")) => Some(ENCRYPTED),
            (p, Some(n)) => dir_of(p).and_then(|d| state.by_name.get(&(d, n.to_owned())).copied()),
            _ => None,
        };
        match found.and_then(|ino| self.attr_of(&state, ino)) {
            Some((attr, ttl)) => reply.entry_with_ttls(&ttl, &ENTRY_TTL, &attr, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let state = lock(&self.state);
        match self.attr_of(&state, ino.0) {
            Some((attr, ttl)) => reply.attr(&ttl, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // Times are accepted and ignored so that `touch` works; ownership and modes are fixed.
        // Setting them to what they already are is accepted, because a virtio-9p server in
        // passthrough mode sets the owner and mode of every file it creates for the guest.
        let mut state = lock(&self.state);
        let Some((mut attr, ttl)) = self.attr_of(&state, ino.0) else {
            reply.error(Errno::ENOENT);
            return;
        };
        if mode.is_some_and(|m| u32::from(attr.perm) != m & 0o7777)
            || uid.is_some_and(|u| u != attr.uid)
            || gid.is_some_and(|g| g != attr.gid)
        {
            reply.error(Errno::EPERM);
            return;
        }
        if let Some(size) = size {
            if attr.kind != FileType::RegularFile {
                reply.error(Errno::EISDIR);
                return;
            }
            let size = usize::try_from(size).unwrap_or(usize::MAX);
            let session = fh.and_then(|fh| match state.handles.get_mut(&fh.0) {
                Some(Handle::Write(s)) => Some(s),
                _ => None,
            });
            match session {
                Some(s) if size > self.max_file_size => {
                    let r = Refusal::TooLarge {
                        limit: self.max_file_size,
                    };
                    warn!(reason = %r, "kpi truncate refused");
                    s.failed = Some(r.errno());
                    reply.error(errno(r.errno()));
                    return;
                }
                Some(s) => {
                    s.buf.resize(size, 0);
                    attr.size = u64::try_from(size).unwrap_or(u64::MAX);
                }
                // Truncating to zero by path (or after an open with O_TRUNC) changes nothing:
                // the next write session replaces the content anyway.
                None if size == 0 => {}
                None => {
                    reply.error(Errno::EPERM);
                    return;
                }
            }
        }
        reply.attr(&ttl, &attr);
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        debug!(parent = parent.0, ?name, "kpi unlink refused");
        reply.error(errno(Refusal::NotPermitted.errno()));
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EPERM);
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EPERM);
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let mut state = lock(&self.state);
        let Some(node) = state.nodes.get(&ino.0) else {
            reply.error(if ino.0 < FIRST_FILE {
                Errno::EISDIR
            } else {
                Errno::ENOENT
            });
            return;
        };
        if let Some(r) = Self::refuse_open(flags.0) {
            warn!(table = %node.name, reason = %r, "kpi open refused");
            reply.error(errno(r.errno()));
            return;
        }
        let handle = match flags.acc_mode() {
            OpenAccMode::O_RDONLY => Handle::Read {
                content: Arc::clone(&node.content),
            },
            mode => Handle::Write(WriteSession {
                ino: ino.0,
                buf: Vec::new(),
                readable: mode == OpenAccMode::O_RDWR,
                writers: Vec::new(),
                anonymous_writer: false,
                dirty: false,
                failed: None,
            }),
        };
        let fh = state.new_handle(handle);
        reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO);
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let Some(dir) = dir_of(parent.0) else {
            reply.error(Errno::EPERM);
            return;
        };
        let name = name.to_string_lossy().into_owned();
        let refused = Self::refuse_open(flags).or_else(|| validate_table_name(&name).err());
        if let Some(r) = refused {
            warn!(dir = dir.as_str(), table = %name, reason = %r, "kpi create refused");
            reply.error(errno(r.errno()));
            return;
        }
        let mut state = lock(&self.state);
        let ino = match state.by_name.get(&(dir, name.clone())) {
            Some(ino) => *ino,
            None => {
                // The table itself is created with the file's first row, so a file whose first
                // write is refused leaves the database untouched.
                if state.nodes.len() >= self.max_tables {
                    let r = Refusal::TooManyTables {
                        limit: self.max_tables,
                    };
                    warn!(dir = dir.as_str(), table = %name, reason = %r, "kpi create refused");
                    reply.error(errno(r.errno()));
                    return;
                }
                state.add_node(dir, name, Arc::new(Vec::new()), SystemTime::now())
            }
        };
        let handle = if flags & libc::O_ACCMODE == libc::O_RDONLY {
            Handle::Read {
                content: state
                    .nodes
                    .get(&ino)
                    .map(|n| Arc::clone(&n.content))
                    .unwrap_or_default(),
            }
        } else {
            Handle::Write(WriteSession {
                ino,
                buf: Vec::new(),
                readable: flags & libc::O_ACCMODE == libc::O_RDWR,
                writers: Vec::new(),
                anonymous_writer: false,
                dirty: false,
                failed: None,
            })
        };
        let fh = state.new_handle(handle);
        match self.attr_of(&state, ino) {
            Some((attr, ttl)) => reply.created(
                &ttl,
                &attr,
                Generation(0),
                FileHandle(fh),
                FopenFlags::FOPEN_DIRECT_IO,
            ),
            None => reply.error(Errno::EIO),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let state = lock(&self.state);
        let bytes: &[u8] = match state.handles.get(&fh.0) {
            Some(Handle::Read { content }) => content,
            Some(Handle::Write(s)) if s.readable => &s.buf,
            _ => {
                reply.error(Errno::EBADF);
                return;
            }
        };
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(bytes.len());
        let end = start
            .saturating_add(usize::try_from(size).unwrap_or(usize::MAX))
            .min(bytes.len());
        reply.data(&bytes[start..end]);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut state = lock(&self.state);
        let State { handles, nodes, .. } = &mut *state;
        let Some(Handle::Write(s)) = handles.get_mut(&fh.0) else {
            reply.error(Errno::EBADF);
            return;
        };
        if let Some(code) = s.failed {
            reply.error(errno(code));
            return;
        }
        let Some(node) = nodes.get(&s.ino) else {
            reply.error(Errno::EIO);
            return;
        };
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let end = start.saturating_add(data.len());
        let refusal = if end > self.max_file_size {
            Some(Refusal::TooLarge {
                limit: self.max_file_size,
            })
        } else {
            if s.buf.len() < end {
                s.buf.resize(end, 0);
            }
            s.buf[start..end].copy_from_slice(data);
            s.dirty = true;
            match lock_owner {
                Some(owner) if !s.writers.contains(&owner.0) => s.writers.push(owner.0),
                Some(_) => {}
                None => s.anonymous_writer = true,
            }
            match node.dir {
                KpiDir::Unencrypted => precheck_partial(&s.buf).err(),
                KpiDir::Encrypted => None,
            }
        };
        match refusal {
            None => reply.written(u32::try_from(data.len()).unwrap_or(u32::MAX)),
            Some(r) => {
                warn!(dir = node.dir.as_str(), table = %node.name, reason = %r, "kpi write refused");
                s.failed = Some(r.errno());
                reply.error(errno(r.errno()));
            }
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.commit_and_reply(fh, Some(lock_owner.0), reply);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // Normally the flush of the last close() has committed already; this catches a session
        // whose flush never came. Its errors can no longer reach the writer.
        let row = {
            let mut state = lock(&self.state);
            let row = self.commit(&mut state, fh.0, None).unwrap_or(None);
            state.handles.remove(&fh.0);
            row
        };
        self.announce(row);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.commit_and_reply(fh, None, reply);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let state = lock(&self.state);
        let mut entries: Vec<(u64, FileType, String)> = vec![
            (ino.0, FileType::Directory, ".".to_owned()),
            (ROOT, FileType::Directory, "..".to_owned()),
        ];
        match ino.0 {
            ROOT => {
                entries.push((UNENCRYPTED, FileType::Directory, "unencrypted".to_owned()));
                entries.push((ENCRYPTED, FileType::Directory, "encrypted".to_owned()));
            }
            other => match dir_of(other) {
                Some(dir) => {
                    let mut files: Vec<(&String, u64)> = state
                        .by_name
                        .iter()
                        .filter(|((d, _), _)| *d == dir)
                        .map(|((_, n), ino)| (n, *ino))
                        .collect();
                    files.sort();
                    entries.extend(
                        files
                            .into_iter()
                            .map(|(n, ino)| (ino, FileType::RegularFile, n.clone())),
                    );
                }
                None => {
                    reply.error(Errno::ENOTDIR);
                    return;
                }
            },
        }
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(skip) {
            if reply.add(INodeNo(ino), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let state = lock(&self.state);
        let files = self.max_tables as u64;
        let used = state.nodes.len() as u64;
        let blocks = files * self.max_file_size as u64 / 4096;
        reply.statfs(
            blocks,
            blocks,
            blocks,
            files,
            files.saturating_sub(used),
            4096,
            MAX_NAME_LEN as u32,
            4096,
        );
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::NO_XATTR);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // The kernel checks modes itself (`default_permissions`).
        reply.ok();
    }
}
