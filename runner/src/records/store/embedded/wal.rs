//! The embedded store's write-ahead log: what makes an append durable.
//!
//! A redb commit that is durable on its own writes every B-tree page the transaction touched and
//! flushes them all, scattered over the file (≈ 270 µs per append on a disk that flushes one
//! small write in ≈ 130 µs). So each write transaction commits to redb *without* flushing, and
//! the rows it wrote are appended to this log as one frame, which is what gets flushed: one
//! small write in place, in a file whose blocks already exist. Writers that arrive while a
//! flush is under way share the next one (group commit).
//!
//! Every [`CHECKPOINT_BYTES`] the log is folded into redb (one durable redb commit) and starts a
//! new *epoch*, overwriting the file from the top. On open, the frames of the current epoch are
//! applied again, in order. They hold plain puts, so a frame redb already has changes nothing; a
//! frame of an older epoch, or one torn by a crash (length or checksum wrong), ends the log. A
//! torn frame was never acknowledged: a writer hears "durable" only after the flush covering its
//! frame, and flushes cover everything written before them.
//!
//! Each epoch also has a random salt, kept in the header only, that every frame of the epoch
//! repeats: bytes inside a frame (a blob a tenant uploaded may hold anything, including
//! something shaped like a frame) can never pass for a frame of a later epoch, whatever the
//! offsets, because their author cannot know that epoch's salt.
//!
//! Every write transaction of the store goes through the log, the memory table's included: a
//! durable redb commit of rows the log does not hold would be undone by replaying an older frame
//! of the same rows, and would make durable the unflushed transactions before it, which the log
//! then replays only in part.
//!
//! File: `header := "CTXOSWAL" | version u32 | 0 u32 | epoch u64 | salt u64`, then
//! `frame := length u32 | crc32(body) u32 | body`, `body := epoch u64 | salt u64 | puts u32 | put*`.
//! Version 3 added the memory row's removal (a put of kind 6); a version 2 log is read the same.
//! Every new epoch is written as version 3, so a build that reads only version 2 refuses the log
//! even after a clean close: to go back to one, remove the `.wal` file after a clean close (its
//! frames are all in the database then).

use std::{
    fs::File,
    io::Read,
    os::unix::fs::FileExt,
    path::Path,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

const MAGIC: &[u8; 8] = b"CTXOSWAL";
const VERSION: u32 = 3;
/// Logs of this older version are read too (they hold a subset of this version's puts).
const READS_VERSION: u32 = 2;
const HEADER_LEN: u64 = 32;
const FRAME_HEAD_LEN: usize = 8;
/// The largest transaction the log takes (far above any blob a run may store; a frame's length
/// is a u32).
const MAX_FRAME_BYTES: usize = 1 << 30;
/// The log is folded into redb once this many bytes were written in an epoch.
pub(super) const CHECKPOINT_BYTES: u64 = 16 << 20;
/// Written with zeros when the log is created, so that flushing a frame never has to allocate
/// blocks or change the file's size (which costs a journal commit on ext4).
const PREALLOCATED_BYTES: u64 = CHECKPOINT_BYTES + (1 << 20);

/// One row a write transaction stored, in the terms of the store's tables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Put {
    /// `entries[(tenant, run, seq)] = value` (an entry, or the run's row at `seq = u64::MAX`).
    Entry {
        tenant: String,
        run: String,
        seq: u64,
        value: Vec<u8>,
    },
    /// `runs_by_time[(tenant, started_ms, run)] = ()`.
    RunByTime {
        tenant: String,
        started_ms: i64,
        run: String,
    },
    /// `blobs[(tenant, hash)] = value`.
    Blob {
        tenant: String,
        hash: [u8; 32],
        value: Vec<u8>,
    },
    /// `checkpoints[(tenant, session)] = value`.
    Checkpoint {
        tenant: String,
        session: String,
        value: Vec<u8>,
    },
    /// `memory[key] = value`.
    Memory { key: Vec<u8>, value: Vec<u8> },
    /// `memory[key]` removed.
    MemoryRemoved { key: Vec<u8> },
}

/// Why the log cannot be used.
#[derive(Debug, thiserror::Error)]
pub(super) enum WalError {
    #[error("record log {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error(
        "{path} is not a ContextOS record log, or one of a version this build does not read; \
         open the store with the contextos version that wrote it (its close folds the log into \
         the database), or move the file away if it is not the store's log"
    )]
    Foreign { path: String },
    #[error(
        "an earlier write to the record log {0} failed; what was appended since may not be \
         durable, so the store accepts no more writes — restart the process, which replays the log"
    )]
    Failed(String),
}

/// Which epoch frames belong to: its number and its secret salt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Epoch {
    number: u64,
    salt: u64,
}

impl Epoch {
    fn next(self) -> Result<Self, std::io::Error> {
        let mut salt = [0u8; 8];
        getrandom::fill(&mut salt).map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(Self {
            number: self.number + 1,
            salt: u64::from_le_bytes(salt),
        })
    }
}

/// Where the next frame goes, and the epoch it belongs to.
#[derive(Debug)]
struct Tail {
    epoch: Epoch,
    offset: u64,
}

/// An open log. Writers append frames in the order their redb transactions commit (the caller
/// holds [`Wal::writer`] across both); any thread may then wait for its frame to be durable.
#[derive(Debug)]
pub(super) struct Wal {
    file: File,
    path: String,
    tail: Mutex<Tail>,
    /// Bytes appended since open (a position that only grows, across epochs).
    written: AtomicU64,
    /// Of those, the bytes known to be on disk.
    synced: AtomicU64,
    sync_lock: Mutex<()>,
    /// Set by the first failed write or flush: nothing written after it can be trusted durable.
    failed: AtomicBool,
}

/// Exclusive right to append: held across a redb write transaction and its frame, so frames are
/// in commit order.
pub(super) struct Writer<'w> {
    wal: &'w Wal,
    tail: std::sync::MutexGuard<'w, Tail>,
}

impl Wal {
    /// Opens the log at `path` (creating it if absent) and returns it with the frames of its
    /// current epoch, which the caller must apply before anything else and then [`Wal::fold`].
    pub(super) fn open(path: &Path) -> Result<(Self, Vec<Vec<Put>>), WalError> {
        let shown = path.display().to_string();
        let io = |source| WalError::Io {
            path: shown.clone(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let mut bytes = Vec::with_capacity(len as usize);
        (&file).read_to_end(&mut bytes).map_err(io)?;
        // A log cut short, or zeros where the header goes (created, not yet written, when the
        // machine stopped), holds nothing acknowledged: it is started anew.
        let fresh = bytes.len() < HEADER_LEN as usize || bytes[..HEADER_LEN as usize].iter().all(|b| *b == 0);
        let (epoch, frames) = if fresh {
            let epoch = Epoch { number: 0, salt: 0 }.next().map_err(io)?;
            // Header first: whatever part of this reaches the disk, the file reads as a log.
            file.write_all_at(&header(epoch), 0).map_err(io)?;
            write_zeros(&file, HEADER_LEN, PREALLOCATED_BYTES).map_err(io)?;
            file.sync_all().map_err(io)?;
            if let Some(dir) = path.parent() {
                File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
            }
            (epoch, Vec::new())
        } else {
            let epoch = parse_header(&bytes).ok_or_else(|| WalError::Foreign { path: shown.clone() })?;
            // The frames about to be replayed may so far be only in the page cache (the process
            // was killed): they are made durable before anything is built on them.
            file.sync_data().map_err(io)?;
            (epoch, read_frames(&bytes, epoch))
        };
        let wal = Self {
            file,
            path: shown,
            tail: Mutex::new(Tail {
                epoch,
                offset: HEADER_LEN,
            }),
            written: AtomicU64::new(0),
            synced: AtomicU64::new(0),
            sync_lock: Mutex::new(()),
            failed: AtomicBool::new(false),
        };
        Ok((wal, frames))
    }

    /// The right to append one frame (waits for the writer before).
    pub(super) fn writer(&self) -> Result<Writer<'_>, WalError> {
        self.check()?;
        let tail = self
            .tail
            .lock()
            .map_err(|_| WalError::Failed(format!("{} (a writer panicked while appending)", self.path)))?;
        Ok(Writer { wal: self, tail })
    }

    /// Waits until everything appended up to `position` is on disk.
    pub(super) fn sync_to(&self, position: u64) -> Result<(), WalError> {
        if self.synced.load(Ordering::Acquire) >= position {
            return self.check();
        }
        let _turn = self
            .sync_lock
            .lock()
            .map_err(|_| WalError::Failed(format!("{} (a flush panicked)", self.path)))?;
        // Whoever flushed while this thread waited may have covered this position too.
        if self.synced.load(Ordering::Acquire) >= position {
            return self.check();
        }
        let covers = self.written.load(Ordering::Acquire);
        if let Err(e) = self.file.sync_data() {
            return Err(self.fail(e));
        }
        self.synced.fetch_max(covers, Ordering::AcqRel);
        self.check()
    }

    /// Whether everything appended up to `position` is on disk already.
    pub(super) fn synced_past(&self, position: u64) -> bool {
        self.synced.load(Ordering::Acquire) >= position
    }

    /// Everything appended so far (a position for [`Wal::sync_to`]).
    pub(super) fn written(&self) -> u64 {
        self.written.load(Ordering::Acquire)
    }

    /// Refuses once a write or flush of the log failed: what the store holds since may not be
    /// durable, so nothing is served from it until the process restarts and replays the log.
    pub(super) fn check(&self) -> Result<(), WalError> {
        if self.failed.load(Ordering::Acquire) {
            Err(WalError::Failed(self.path.clone()))
        } else {
            Ok(())
        }
    }

    fn fail(&self, e: std::io::Error) -> WalError {
        self.failed.store(true, Ordering::Release);
        tracing::error!(log = %self.path, error = %e, "the record log could not be written; the store refuses writes until restarted");
        WalError::Io {
            path: self.path.clone(),
            source: e,
        }
    }
}

impl Writer<'_> {
    /// Appends one transaction's puts as a frame (not yet flushed) and returns the position to
    /// [`Wal::sync_to`] before telling anyone the transaction is durable. On error the caller
    /// must not commit the transaction.
    pub(super) fn append(&mut self, puts: &[Put]) -> Result<u64, WalError> {
        let frame = encode_frame(self.tail.epoch, puts);
        if frame.len() > MAX_FRAME_BYTES {
            return Err(WalError::Io {
                path: self.wal.path.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "one transaction of {} bytes; the log takes at most {MAX_FRAME_BYTES}",
                        frame.len()
                    ),
                ),
            });
        }
        if let Err(e) = self.wal.file.write_all_at(&frame, self.tail.offset) {
            return Err(self.wal.fail(e));
        }
        self.tail.offset += frame.len() as u64;
        Ok(self.wal.written.fetch_add(frame.len() as u64, Ordering::AcqRel) + frame.len() as u64)
    }

    /// Whether this epoch is long enough to be folded into redb.
    pub(super) fn wants_fold(&self) -> bool {
        self.tail.offset >= CHECKPOINT_BYTES
    }

    /// Flushes every frame written so far. Call before a durable redb commit that a fold will
    /// follow: were the machine to stop after that commit but before the new epoch is on disk,
    /// the epoch is replayed over it, and only the whole epoch (not a prefix of it, which would
    /// take runs' heads back) leaves redb as it was.
    pub(super) fn flush_all(&self) -> Result<(), WalError> {
        self.wal.sync_to(self.wal.written.load(Ordering::Acquire))
    }

    /// Starts a new epoch. Call only after [`Writer::flush_all`] and then a durable redb commit
    /// that holds every frame so far: from here on they are not replayed.
    pub(super) fn fold(&mut self) -> Result<(), WalError> {
        let result = self.tail.epoch.next().and_then(|epoch| {
            self.wal.file.write_all_at(&header(epoch), 0)?;
            self.wal.file.sync_data()?;
            Ok(epoch)
        });
        let epoch = match result {
            Ok(epoch) => epoch,
            Err(e) => return Err(self.wal.fail(e)),
        };
        self.tail.epoch = epoch;
        self.tail.offset = HEADER_LEN;
        // Everything written before is in redb, durably.
        let written = self.wal.written.load(Ordering::Acquire);
        self.wal.synced.fetch_max(written, Ordering::AcqRel);
        Ok(())
    }

    /// Marks the log failed: a transaction whose frame was written did not commit, so the log
    /// and redb disagree until the next open replays it.
    pub(super) fn poison(&self, why: &str) {
        self.wal.failed.store(true, Ordering::Release);
        tracing::error!(log = %self.wal.path, "{why}; the store refuses writes until restarted");
    }
}

fn write_zeros(file: &File, from: u64, len: u64) -> std::io::Result<()> {
    let chunk = vec![0u8; 1 << 20];
    let mut at = from;
    while at < len {
        let n = chunk.len().min((len - at) as usize);
        file.write_all_at(&chunk[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

fn header(epoch: Epoch) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN as usize);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&epoch.number.to_le_bytes());
    out.extend_from_slice(&epoch.salt.to_le_bytes());
    out
}

fn parse_header(bytes: &[u8]) -> Option<Epoch> {
    if bytes.len() < HEADER_LEN as usize || &bytes[..8] != MAGIC {
        return None;
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().ok()?);
    if version != VERSION && version != READS_VERSION {
        return None;
    }
    Some(Epoch {
        number: u64::from_le_bytes(bytes[16..24].try_into().ok()?),
        salt: u64::from_le_bytes(bytes[24..32].try_into().ok()?),
    })
}

/// The frames of `epoch` from the top of the log, up to the first that is not one.
fn read_frames(bytes: &[u8], epoch: Epoch) -> Vec<Vec<Put>> {
    let mut frames = Vec::new();
    let mut at = HEADER_LEN as usize;
    while let Some(head) = bytes.get(at..at + FRAME_HEAD_LEN) {
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        let Some(body) = bytes.get(at + FRAME_HEAD_LEN..at + FRAME_HEAD_LEN + len) else {
            break;
        };
        if len == 0 || crc32fast::hash(body) != crc {
            break;
        }
        let mut reader = Reader(body);
        if reader.u64() != Some(epoch.number) || reader.u64() != Some(epoch.salt) {
            break;
        }
        let Some(puts) = reader.puts() else {
            break;
        };
        frames.push(puts);
        at += FRAME_HEAD_LEN + len;
    }
    frames
}

fn encode_frame(epoch: Epoch, puts: &[Put]) -> Vec<u8> {
    // The body is encoded in place after room for its length and checksum (a blob's bytes are
    // copied once).
    let mut frame = Vec::with_capacity(FRAME_HEAD_LEN + 64 + puts.iter().map(Put::weight).sum::<usize>());
    frame.extend_from_slice(&[0; FRAME_HEAD_LEN]);
    frame.extend_from_slice(&epoch.number.to_le_bytes());
    frame.extend_from_slice(&epoch.salt.to_le_bytes());
    frame.extend_from_slice(&(puts.len() as u32).to_le_bytes());
    for put in puts {
        put.encode(&mut frame);
    }
    let body = &frame[FRAME_HEAD_LEN..];
    let (len, crc) = (
        (body.len() as u32).to_le_bytes(),
        crc32fast::hash(body).to_le_bytes(),
    );
    frame[..4].copy_from_slice(&len);
    frame[4..FRAME_HEAD_LEN].copy_from_slice(&crc);
    frame
}

impl Put {
    fn weight(&self) -> usize {
        match self {
            Self::Entry {
                tenant, run, value, ..
            } => tenant.len() + run.len() + value.len() + 24,
            Self::RunByTime { tenant, run, .. } => tenant.len() + run.len() + 24,
            Self::Blob { tenant, value, .. } => tenant.len() + value.len() + 48,
            Self::Checkpoint {
                tenant,
                session,
                value,
            } => tenant.len() + session.len() + value.len() + 24,
            Self::Memory { key, value } => key.len() + value.len() + 16,
            Self::MemoryRemoved { key } => key.len() + 8,
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        let bytes = |out: &mut Vec<u8>, b: &[u8]| {
            out.extend_from_slice(&(b.len() as u32).to_le_bytes());
            out.extend_from_slice(b);
        };
        match self {
            Self::Entry {
                tenant,
                run,
                seq,
                value,
            } => {
                out.push(1);
                bytes(out, tenant.as_bytes());
                bytes(out, run.as_bytes());
                out.extend_from_slice(&seq.to_le_bytes());
                bytes(out, value);
            }
            Self::RunByTime {
                tenant,
                started_ms,
                run,
            } => {
                out.push(2);
                bytes(out, tenant.as_bytes());
                out.extend_from_slice(&started_ms.to_le_bytes());
                bytes(out, run.as_bytes());
            }
            Self::Blob { tenant, hash, value } => {
                out.push(3);
                bytes(out, tenant.as_bytes());
                out.extend_from_slice(hash);
                bytes(out, value);
            }
            Self::Checkpoint {
                tenant,
                session,
                value,
            } => {
                out.push(4);
                bytes(out, tenant.as_bytes());
                bytes(out, session.as_bytes());
                bytes(out, value);
            }
            Self::Memory { key, value } => {
                out.push(5);
                bytes(out, key);
                bytes(out, value);
            }
            Self::MemoryRemoved { key } => {
                out.push(6);
                bytes(out, key);
            }
        }
    }
}

/// Reads a frame body; `None` wherever it does not hold what it should (a frame that passed its
/// checksum but is not one this build wrote ends the log like a torn one).
struct Reader<'b>(&'b [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn bytes(&mut self) -> Option<Vec<u8>> {
        let n = self.u32()? as usize;
        Some(self.take(n)?.to_vec())
    }

    fn string(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?).ok()
    }

    fn puts(&mut self) -> Option<Vec<Put>> {
        let count = self.u32()? as usize;
        // Each put takes at least 5 bytes (a removal of an empty key): a count larger than the
        // body could hold is garbage.
        if count > self.0.len() / 5 {
            return None;
        }
        let mut puts = Vec::with_capacity(count);
        for _ in 0..count {
            let put = match self.take(1)?[0] {
                1 => Put::Entry {
                    tenant: self.string()?,
                    run: self.string()?,
                    seq: self.u64()?,
                    value: self.bytes()?,
                },
                2 => Put::RunByTime {
                    tenant: self.string()?,
                    started_ms: self.u64()? as i64,
                    run: self.string()?,
                },
                3 => Put::Blob {
                    tenant: self.string()?,
                    hash: self.take(32)?.try_into().ok()?,
                    value: self.bytes()?,
                },
                4 => Put::Checkpoint {
                    tenant: self.string()?,
                    session: self.string()?,
                    value: self.bytes()?,
                },
                5 => Put::Memory {
                    key: self.bytes()?,
                    value: self.bytes()?,
                },
                6 => Put::MemoryRemoved { key: self.bytes()? },
                _ => return None,
            };
            puts.push(put);
        }
        self.0.is_empty().then_some(puts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn puts(n: u64) -> Vec<Put> {
        vec![
            Put::Entry {
                tenant: "shop".into(),
                run: "run-1".into(),
                seq: n,
                value: vec![n as u8; 40],
            },
            Put::RunByTime {
                tenant: "shop".into(),
                started_ms: -5,
                run: "run-1".into(),
            },
            Put::Blob {
                tenant: "shop".into(),
                hash: [n as u8; 32],
                value: b"blob".to_vec(),
            },
            Put::Checkpoint {
                tenant: "shop".into(),
                session: "s".into(),
                value: b"{}".to_vec(),
            },
            Put::Memory {
                key: format!("cx/shop/m/u/tenant/{n}").into_bytes(),
                value: b"{\"h\":[]}".to_vec(),
            },
            Put::MemoryRemoved {
                key: format!("cx/shop/m/u/tenant/{n}/old").into_bytes(),
            },
        ]
    }

    fn write(wal: &Wal, frames: std::ops::Range<u64>) {
        for n in frames {
            let at = wal.writer().expect("writer").append(&puts(n)).expect("append");
            wal.sync_to(at).expect("sync");
        }
    }

    #[test]
    fn frames_written_are_read_back_in_order_after_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log");
        let (wal, frames) = Wal::open(&path).expect("create");
        assert!(frames.is_empty());
        write(&wal, 0..3);
        drop(wal);
        let (_, frames) = Wal::open(&path).expect("reopen");
        assert_eq!(frames, (0..3).map(puts).collect::<Vec<_>>());
    }

    #[test]
    fn a_log_of_the_previous_version_is_read_and_its_next_epoch_is_of_this_version() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log");
        let (wal, _) = Wal::open(&path).expect("create");
        let old = vec![puts(0)[..5].to_vec()];
        let at = wal.writer().expect("writer").append(&old[0]).expect("append");
        wal.sync_to(at).expect("sync");
        drop(wal);
        let file = std::fs::OpenOptions::new().write(true).open(&path).expect("open");
        file.write_all_at(&READS_VERSION.to_le_bytes(), 8)
            .expect("version 2");
        let (wal, frames) = Wal::open(&path).expect("reopen");
        assert_eq!(frames, old);
        wal.writer().expect("writer").fold().expect("fold");
        let mut header = [0u8; 12];
        std::fs::File::open(&path)
            .expect("open")
            .read_exact(&mut header)
            .expect("header");
        assert_eq!(header[8..12], VERSION.to_le_bytes());
        // Any other version is not read as a log.
        file.write_all_at(&(VERSION + 1).to_le_bytes(), 8)
            .expect("version 4");
        assert!(matches!(Wal::open(&path), Err(WalError::Foreign { .. })));
    }

    #[test]
    fn a_torn_or_corrupted_last_frame_ends_the_log_and_what_came_before_is_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log");
        let (wal, _) = Wal::open(&path).expect("create");
        write(&wal, 0..3);
        let end = HEADER_LEN + wal.written.load(Ordering::Acquire);
        drop(wal);
        let file = std::fs::OpenOptions::new().write(true).open(&path).expect("open");
        // Flip one byte inside the last frame's body: its checksum no longer matches.
        file.write_all_at(&[0xff], end - 3).expect("corrupt");
        let (_, frames) = Wal::open(&path).expect("reopen");
        assert_eq!(frames, (0..2).map(puts).collect::<Vec<_>>());
        // A length that runs past the end of the file (a frame cut short) also ends it.
        file.write_all_at(&u32::MAX.to_le_bytes(), HEADER_LEN)
            .expect("corrupt");
        let (_, frames) = Wal::open(&path).expect("reopen");
        assert!(frames.is_empty());
    }

    #[test]
    fn frames_of_an_earlier_epoch_left_in_the_file_are_not_replayed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log");
        let (wal, _) = Wal::open(&path).expect("create");
        write(&wal, 0..5);
        wal.writer().expect("writer").fold().expect("fold");
        // The new epoch overwrites the first frames; frames 2..5 of the old one remain behind.
        write(&wal, 10..12);
        drop(wal);
        let (_, frames) = Wal::open(&path).expect("reopen");
        assert_eq!(frames, vec![puts(10), puts(11)]);
    }

    #[test]
    fn concurrent_writers_each_hear_durable_and_every_frame_is_replayed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log");
        let (wal, _) = Wal::open(&path).expect("create");
        std::thread::scope(|scope| {
            for thread in 0..8u64 {
                let wal = &wal;
                scope.spawn(move || write(wal, thread * 1000..thread * 1000 + 50));
            }
        });
        assert_eq!(
            wal.synced.load(Ordering::Acquire),
            wal.written.load(Ordering::Acquire),
            "every writer waited for a flush that covered its frame"
        );
        drop(wal);
        let (_, frames) = Wal::open(&path).expect("reopen");
        assert_eq!(frames.len(), 400);
        for thread in 0..8u64 {
            let own: Vec<_> = frames
                .iter()
                .filter(|f| matches!(&f[0], Put::Entry { seq, .. } if seq / 1000 == thread))
                .cloned()
                .collect();
            assert_eq!(
                own,
                (thread * 1000..thread * 1000 + 50).map(puts).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn after_a_failed_write_the_log_refuses_writers_and_says_to_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (wal, _) = Wal::open(&dir.path().join("log")).expect("create");
        wal.writer().expect("writer").poison("a test failure");
        let refused = wal.writer().err().expect("refused").to_string();
        assert!(refused.contains("restart the process"), "{refused}");
        assert!(wal.sync_to(u64::MAX).is_err());
    }

    #[test]
    fn a_frame_hidden_in_uploaded_bytes_never_replays_as_one_of_a_later_epoch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log");
        let (wal, _) = Wal::open(&path).expect("create");
        let next = wal.tail.lock().expect("tail").epoch.number + 1;
        // A tenant's blob holding a well-formed frame of the next epoch, with a guessed salt.
        let forged = encode_frame(
            Epoch {
                number: next,
                salt: 0,
            },
            &[Put::Entry {
                tenant: "other-tenant".into(),
                run: "their-run".into(),
                seq: 0,
                value: b"forged".to_vec(),
            }],
        );
        write(&wal, 0..1);
        wal.writer()
            .expect("writer")
            .append(&[Put::Blob {
                tenant: "shop".into(),
                hash: [1; 32],
                value: forged.clone(),
            }])
            .expect("append");
        // The blob's bytes end its frame, which ends the log so far.
        let at = wal.tail.lock().expect("tail").offset - forged.len() as u64;
        wal.writer().expect("writer").fold().expect("fold");
        // The next epoch's frames end exactly where the forged bytes begin.
        let filler = (at - HEADER_LEN) as usize;
        let frame_len = |n: usize| {
            encode_frame(
                Epoch {
                    number: next,
                    salt: 0,
                },
                &[Put::Checkpoint {
                    tenant: "t".into(),
                    session: "s".into(),
                    value: vec![0; n],
                }],
            )
            .len()
        };
        let overhead = frame_len(0);
        wal.writer()
            .expect("writer")
            .append(&[Put::Checkpoint {
                tenant: "t".into(),
                session: "s".into(),
                value: vec![0; filler - overhead],
            }])
            .expect("append");
        assert_eq!(wal.tail.lock().expect("tail").offset, at);
        drop(wal);
        let (_, frames) = Wal::open(&path).expect("reopen");
        assert_eq!(frames.len(), 1, "only the filler frame: {frames:?}");
        assert!(matches!(frames[0][0], Put::Checkpoint { .. }));
    }

    #[test]
    fn a_file_that_is_not_a_log_is_refused_not_overwritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log");
        std::fs::write(&path, b"these are somebody else's bytes, kept as they are").expect("write");
        assert!(matches!(Wal::open(&path), Err(WalError::Foreign { .. })));
        assert_eq!(
            std::fs::read(&path).expect("read"),
            b"these are somebody else's bytes, kept as they are"
        );
    }

    #[test]
    fn any_damage_to_a_log_yields_a_prefix_of_what_was_written_never_a_panic_or_other_rows() {
        let frames: Vec<Vec<Put>> = (0..6).map(puts).collect();
        let epoch = Epoch {
            number: 3,
            salt: 0x5a17,
        };
        let mut log = header(epoch);
        for frame in &frames {
            log.extend_from_slice(&encode_frame(epoch, frame));
        }
        // A small deterministic generator: every run of the test damages the same bytes.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..2_000 {
            let mut damaged = log.clone();
            match next() % 3 {
                0 => {
                    let at = HEADER_LEN as usize + (next() as usize) % (damaged.len() - HEADER_LEN as usize);
                    damaged[at] ^= 1 << (next() % 8);
                }
                1 => damaged
                    .truncate(HEADER_LEN as usize + (next() as usize) % (log.len() - HEADER_LEN as usize)),
                _ => {
                    let at = HEADER_LEN as usize + (next() as usize) % (damaged.len() - HEADER_LEN as usize);
                    let garbage: Vec<u8> = (0..(next() % 64)).map(|_| next() as u8).collect();
                    damaged.splice(at..at, garbage);
                }
            }
            let read = read_frames(&damaged, epoch);
            assert!(read.len() <= frames.len());
            assert_eq!(
                read,
                frames[..read.len()],
                "only whole frames, in order, as written"
            );
        }
    }

    #[test]
    fn bodies_that_pass_the_checksum_but_are_not_frames_end_the_log() {
        let epoch = Epoch { number: 1, salt: 7 };
        let stamp = [1u64.to_le_bytes(), 7u64.to_le_bytes()].concat();
        for body in [
            vec![],
            stamp.clone(),
            [stamp.as_slice(), &u32::MAX.to_le_bytes()].concat(),
            [stamp.as_slice(), &1u32.to_le_bytes(), &[9]].concat(),
        ] {
            let mut bytes = header(epoch);
            bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
            bytes.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
            bytes.extend_from_slice(&body);
            assert_eq!(read_frames(&bytes, epoch), Vec::<Vec<Put>>::new());
        }
    }
}
