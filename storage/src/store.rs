//! The redb file: tables, schema version, opening with recovery.

use std::os::unix::fs::PermissionsExt;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use crate::seal::Key;

fn boot_id() -> Vec<u8> {
    std::fs::read("/proc/sys/kernel/random/boot_id").unwrap_or_default()
}
use crate::{Error, Result};

/// Version of the tables' layout this build reads and writes.
pub const SCHEMA_VERSION: u32 = 1;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const SECRETS: TableDefinition<u32, &[u8]> = TableDefinition::new("secrets");
const DNS: TableDefinition<&str, &[u8]> = TableDefinition::new("dns");
const CONNS: TableDefinition<(u32, u64, i32), &[u8]> = TableDefinition::new("conns");
const TRACKED: TableDefinition<u64, &[u8]> = TableDefinition::new("tracked");
/// (tgid, start time, TLS object address) -> the socket fd it writes to.
const SSL_FDS: TableDefinition<(u32, u64, u64), i32> = TableDefinition::new("ssl_fds");

/// One secret as the data path needs it after a restart.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretRecord {
    pub id: u32,
    /// `namespace/secret/key` on Kubernetes, the file's name for `kloak run`.
    pub name: String,
    pub placeholder: String,
    pub value: Vec<u8>,
    pub hosts: Vec<String>,
    pub ports: Vec<u16>,
    /// Served by the wire backend only (files from before it was kept read
    /// as false).
    #[serde(default)]
    pub require_wire: bool,
}

impl Drop for SecretRecord {
    fn drop(&mut self) {
        self.value.zeroize();
    }
}

impl std::fmt::Debug for SecretRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretRecord")
            .field("id", &self.id)
            .field("name", &self.name)
            .field(
                "value",
                &format_args!("<{} bytes redacted>", self.value.len()),
            )
            .finish_non_exhaustive()
    }
}

/// A trusted DNS answer a process received: `name` resolved to `ip`,
/// valid from `seen_ns` to `expires_ns` on the kernel's monotonic clock
/// (which runs on across agent restarts; a reboot clears these tables).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsRecord {
    pub tgid: u32,
    /// Field 22 of /proc/PID/stat: with `tgid`, names the process for good.
    pub start_time: u64,
    pub ip: String,
    pub name: String,
    pub seen_ns: u64,
    pub expires_ns: u64,
}

/// A socket of a process, stable across agent restarts: the pid alone could
/// be reused, the pid with the process's start time cannot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKey {
    pub tgid: u32,
    /// Field 22 of /proc/PID/stat (clock ticks after boot).
    pub start_time: u64,
    pub fd: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnRecord {
    /// `ip:port` the socket was connected to.
    pub dest: String,
    /// When, on the kernel's monotonic clock.
    pub connected_ns: u64,
}

/// A TLS object (an `SSL*`) of a process, and the socket it writes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SslRecord {
    pub tgid: u32,
    pub start_time: u64,
    pub ptr: u64,
    pub fd: i32,
}

/// A container the agent tracks, and what its processes may receive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackedRecord {
    /// cgroup v2 id, or the agent's id for a pid-tracked (v1) container.
    pub id: u64,
    pub cgroup: PathBuf,
    pub by_pid: bool,
    /// `namespace/pod`.
    pub pod: String,
    pub secrets: Vec<u32>,
    /// The container's name in its pod (files from before it was kept
    /// read as empty).
    #[serde(default)]
    pub container: String,
}

/// Changes applied together in one transaction: the agent batches what
/// the kernel reports, so the file sees one commit per batch, not per event.
#[derive(Debug, Default)]
pub struct Batch {
    pub secrets: Vec<SecretRecord>,
    pub removed_secrets: Vec<u32>,
    pub tracked: Vec<TrackedRecord>,
    pub untracked: Vec<u64>,
    pub dns: Vec<DnsRecord>,
    pub conns: Vec<(ConnKey, ConnRecord)>,
    pub closed: Vec<ConnKey>,
    pub ssl: Vec<SslRecord>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
            && self.removed_secrets.is_empty()
            && self.tracked.is_empty()
            && self.untracked.is_empty()
            && self.dns.is_empty()
            && self.conns.is_empty()
            && self.closed.is_empty()
            && self.ssl.is_empty()
    }

    pub fn len(&self) -> usize {
        self.secrets.len()
            + self.removed_secrets.len()
            + self.tracked.len()
            + self.untracked.len()
            + self.dns.len()
            + self.conns.len()
            + self.closed.len()
            + self.ssl.len()
    }
}

/// What opening found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// No usable state: the maps start empty and fill from the source.
    pub fresh: bool,
    /// The node rebooted since the file was written: DNS answers and
    /// connections (tied to processes and to the monotonic clock) were dropped.
    pub rebooted: bool,
    /// The unusable file was moved here, for the reason given.
    pub moved_aside: Option<(PathBuf, String)>,
    pub migrated_from: Option<u32>,
}

pub struct Store {
    db: Database,
    key: Key,
    path: PathBuf,
}

/// Why a file that opened cannot be used.
enum Unusable {
    Bad(String),
    Fatal(Error),
}

/// A file that cannot be written for want of space is not a damaged file:
/// it stays where it is, and the caller runs without it.
fn unusable(reason: String) -> Unusable {
    if reason.contains("No space left on device") {
        Unusable::Fatal(Error::Db(reason))
    } else {
        Unusable::Bad(reason)
    }
}

fn db_err(e: impl std::fmt::Display) -> Error {
    Error::Db(e.to_string())
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn owner_file(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".owner");
    PathBuf::from(p)
}

impl Store {
    /// Opens (or creates) the state file at `path`. A file that cannot be
    /// used is moved aside and replaced by an empty one; only "another agent
    /// holds it" and I/O errors on the directory are returned as errors.
    pub fn open(path: &Path, key: Key) -> Result<(Store, OpenReport)> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| Error::Io {
                path: dir.into(),
                what: "creating the state directory",
                source,
            })?;
        }
        let existed = path.exists();
        let (aside, reason) = match Store::try_open(path, &key) {
            Ok((store, (migrated_from, rebooted))) => {
                return Ok((
                    store,
                    OpenReport {
                        fresh: !existed,
                        rebooted,
                        moved_aside: None,
                        migrated_from,
                    },
                ));
            }
            Err(Unusable::Fatal(e)) => return Err(e),
            Err(Unusable::Bad(reason)) => {
                let aside = PathBuf::from(format!("{}.bad-{}", path.display(), unix_ms()));
                std::fs::rename(path, &aside).map_err(|source| Error::Io {
                    path: path.into(),
                    what: "moving the unusable state file aside",
                    source,
                })?;
                tracing::warn!(path = %path.display(), moved_to = %aside.display(), reason = %reason, "state file unusable; starting empty and rebuilding from the source");
                (aside, reason)
            }
        };
        match Store::try_open(path, &key) {
            Ok((store, _)) => Ok((
                store,
                OpenReport {
                    fresh: true,
                    rebooted: false,
                    moved_aside: Some((aside, reason)),
                    migrated_from: None,
                },
            )),
            Err(Unusable::Fatal(e)) => Err(e),
            Err(Unusable::Bad(r)) => Err(Error::Db(format!(
                "a new state file at {} is unusable too: {r}",
                path.display()
            ))),
        }
    }

    fn try_open(path: &Path, key: &Key) -> Result<(Store, (Option<u32>, bool)), Unusable> {
        // redb checks some invariants with assertions; a damaged file must
        // never take the agent down with it.
        let opened = std::panic::catch_unwind(AssertUnwindSafe(|| Database::create(path)));
        let db = match opened {
            Ok(Ok(db)) => db,
            Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen)) => {
                let holder = std::fs::read_to_string(owner_file(path))
                    .map(|s| s.trim().to_string())
                    .unwrap_or_else(|_| "holder unknown".into());
                return Err(Unusable::Fatal(Error::Locked {
                    path: path.into(),
                    holder,
                }));
            }
            Ok(Err(e)) => return Err(unusable(format!("not a readable state file ({e})"))),
            Err(_) => return Err(Unusable::Bad("not a readable state file (damaged)".into())),
        };
        if let Err(source) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        {
            return Err(Unusable::Fatal(Error::Io {
                path: path.into(),
                what: "setting mode 0600",
                source,
            }));
        }
        let _ = std::fs::write(
            owner_file(path),
            format!(
                "pid {} ({}), since Unix ms {}\n",
                std::process::id(),
                std::fs::read_to_string("/proc/self/comm")
                    .unwrap_or_default()
                    .trim(),
                unix_ms()
            ),
        );
        let store = Store {
            db,
            key: key.clone(),
            path: path.into(),
        };
        let checked = std::panic::catch_unwind(AssertUnwindSafe(|| store.check_and_migrate()));
        match checked {
            Ok(Ok(migrated)) => Ok((store, migrated)),
            Ok(Err(reason)) => Err(unusable(reason)),
            Err(_) => Err(Unusable::Bad("damaged tables".into())),
        }
    }

    /// Reads the schema version and key fingerprint (writing them into a new
    /// file), migrates older layouts, and opens every sealed record once.
    fn check_and_migrate(&self) -> Result<(Option<u32>, bool), String> {
        let w = self.db.begin_write().map_err(|e| e.to_string())?;
        let mut migrated = None;
        let mut rebooted = false;
        {
            let mut meta = w.open_table(META).map_err(|e| e.to_string())?;
            let version = meta
                .get("schema_version")
                .map_err(|e| e.to_string())?
                .map(|v| v.value().try_into().map(u32::from_le_bytes))
                .transpose()
                .map_err(|_| "schema version record is damaged".to_string())?;
            let fp = meta
                .get("key_fingerprint")
                .map_err(|e| e.to_string())?
                .map(|v| v.value().to_vec());
            match version {
                None => {
                    meta.insert("schema_version", &SCHEMA_VERSION.to_le_bytes()[..])
                        .map_err(|e| e.to_string())?;
                    meta.insert("key_fingerprint", &self.key.fingerprint[..])
                        .map_err(|e| e.to_string())?;
                }
                Some(v) if v > SCHEMA_VERSION => {
                    return Err(format!(
                        "written by a newer Kloak (schema {v}; this build reads up to {SCHEMA_VERSION})"
                    ));
                }
                Some(v) => {
                    if fp.as_deref() != Some(&self.key.fingerprint[..]) {
                        return Err("sealed with another key (--state-key-file changed)".into());
                    }
                    if v < SCHEMA_VERSION {
                        migrate(&w, v).map_err(|e| format!("migrating from schema {v}: {e}"))?;
                        meta.insert("schema_version", &SCHEMA_VERSION.to_le_bytes()[..])
                            .map_err(|e| e.to_string())?;
                        migrated = Some(v);
                    }
                }
            }
            let boot = boot_id();
            let written_in = meta
                .get("boot_id")
                .map_err(|e| e.to_string())?
                .map(|v| v.value().to_vec());
            if written_in.is_some_and(|b| b != boot) {
                // Processes and the monotonic clock started over.
                w.delete_table(DNS).map_err(|e| e.to_string())?;
                w.delete_table(CONNS).map_err(|e| e.to_string())?;
                w.delete_table(TRACKED).map_err(|e| e.to_string())?;
                w.delete_table(SSL_FDS).map_err(|e| e.to_string())?;
                rebooted = true;
            }
            meta.insert("boot_id", &boot[..])
                .map_err(|e| e.to_string())?;
            // Every table exists from here on, so readers need not care.
            w.open_table(SECRETS).map_err(|e| e.to_string())?;
            w.open_table(DNS).map_err(|e| e.to_string())?;
            w.open_table(CONNS).map_err(|e| e.to_string())?;
            w.open_table(TRACKED).map_err(|e| e.to_string())?;
            w.open_table(SSL_FDS).map_err(|e| e.to_string())?;
        }
        w.commit().map_err(|e| e.to_string())?;
        self.secrets().map_err(|e| e.to_string())?;
        self.dns().map_err(|e| e.to_string())?;
        self.conns().map_err(|e| e.to_string())?;
        self.tracked().map_err(|e| e.to_string())?;
        Ok((migrated, rebooted))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
    ) -> Result<()> {
        let w = self.db.begin_write().map_err(db_err)?;
        f(&w).map_err(db_err)?;
        w.commit().map_err(db_err)
    }

    /// Applies a batch in one transaction, in the order: removals after
    /// puts of the same kind, so a put then a removal in one batch removes.
    pub fn apply(&self, b: &Batch) -> Result<()> {
        if b.is_empty() {
            return Ok(());
        }
        let sealed: Vec<(u32, Vec<u8>)> = b
            .secrets
            .iter()
            .map(|r| {
                let plain =
                    zeroize::Zeroizing::new(serde_json::to_vec(r).expect("records serialise"));
                (r.id, self.key.seal(&Store::aad(r.id), &plain))
            })
            .collect();
        self.write(|w| {
            {
                let mut t = w.open_table(SECRETS)?;
                for (id, v) in &sealed {
                    t.insert(*id, &v[..])?;
                }
                for id in &b.removed_secrets {
                    t.remove(*id)?;
                }
            }
            {
                let mut t = w.open_table(TRACKED)?;
                for r in &b.tracked {
                    let v = serde_json::to_vec(r).expect("records serialise");
                    t.insert(r.id, &v[..])?;
                }
                for id in &b.untracked {
                    t.remove(*id)?;
                }
            }
            {
                let mut t = w.open_table(DNS)?;
                for r in &b.dns {
                    let v = serde_json::to_vec(r).expect("records serialise");
                    t.insert(Store::dns_key(r).as_str(), &v[..])?;
                }
            }
            {
                let mut t = w.open_table(CONNS)?;
                for (k, r) in &b.conns {
                    let v = serde_json::to_vec(r).expect("records serialise");
                    t.insert((k.tgid, k.start_time, k.fd), &v[..])?;
                }
                for k in &b.closed {
                    t.remove((k.tgid, k.start_time, k.fd))?;
                }
            }
            {
                let mut t = w.open_table(SSL_FDS)?;
                for r in &b.ssl {
                    t.insert((r.tgid, r.start_time, r.ptr), r.fd)?;
                }
            }
            Ok(())
        })
    }

    pub fn ssl_fds(&self) -> Result<Vec<SslRecord>> {
        let r = self.db.begin_read().map_err(db_err)?;
        let t = r.open_table(SSL_FDS).map_err(db_err)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            let (tgid, start_time, ptr) = k.value();
            out.push(SslRecord {
                tgid,
                start_time,
                ptr,
                fd: v.value(),
            });
        }
        Ok(out)
    }

    /// Drops the connections and DNS answers of processes that are gone:
    /// `alive` says whether (tgid, start time) still runs.
    pub fn prune_processes(&self, alive: impl Fn(u32, u64) -> bool) -> Result<usize> {
        let conns: Vec<ConnKey> = self
            .conns()?
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| !alive(k.tgid, k.start_time))
            .collect();
        let dns: Vec<String> = self
            .dns()?
            .into_iter()
            .filter(|r| !alive(r.tgid, r.start_time))
            .map(|r| Store::dns_key(&r))
            .collect();
        let ssl: Vec<(u32, u64, u64)> = self
            .ssl_fds()?
            .into_iter()
            .filter(|r| !alive(r.tgid, r.start_time))
            .map(|r| (r.tgid, r.start_time, r.ptr))
            .collect();
        let n = conns.len() + dns.len() + ssl.len();
        if n > 0 {
            self.write(|w| {
                let mut t = w.open_table(CONNS)?;
                for k in &conns {
                    t.remove((k.tgid, k.start_time, k.fd))?;
                }
                let mut t = w.open_table(DNS)?;
                for k in &dns {
                    t.remove(k.as_str())?;
                }
                let mut t = w.open_table(SSL_FDS)?;
                for k in &ssl {
                    t.remove(*k)?;
                }
                Ok(())
            })?;
        }
        Ok(n)
    }

    /// Size of the state file in bytes.
    pub fn file_bytes(&self) -> u64 {
        std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0)
    }

    fn aad(id: u32) -> Vec<u8> {
        format!("secrets/{id}").into_bytes()
    }

    pub fn put_secret(&self, r: &SecretRecord) -> Result<()> {
        let plain = zeroize::Zeroizing::new(serde_json::to_vec(r).expect("records serialise"));
        let sealed = self.key.seal(&Store::aad(r.id), &plain);
        self.write(|w| {
            w.open_table(SECRETS)?.insert(r.id, &sealed[..])?;
            Ok(())
        })
    }

    pub fn remove_secret(&self, id: u32) -> Result<()> {
        self.write(|w| {
            w.open_table(SECRETS)?.remove(id)?;
            Ok(())
        })
    }

    /// Opens the file and reads every record. A file whose records do not
    /// read back (a damaged page, a record that does not open) is treated
    /// like one that does not open at all: moved aside, started empty.
    pub fn open_loaded(path: &Path, key: Key) -> Result<(Store, OpenReport, Snapshot)> {
        let (store, report) = Store::open(path, key.clone())?;
        // redb asserts on some damage while reading, as while opening.
        let read = std::panic::catch_unwind(AssertUnwindSafe(|| store.snapshot()));
        let err = match read {
            Ok(Ok(snap)) => return Ok((store, report, snap)),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "damaged".to_string(),
        };
        drop(store);
        let reason = format!("records do not read back ({err})");
        let aside = PathBuf::from(format!("{}.bad-{}", path.display(), unix_ms()));
        std::fs::rename(path, &aside).map_err(|source| Error::Io {
            path: path.into(),
            what: "moving the unusable state file aside",
            source,
        })?;
        tracing::warn!(path = %path.display(), moved_to = %aside.display(), reason = %reason, "state file unusable; starting empty and rebuilding from the source");
        let (store, mut report) = Store::open(path, key)?;
        report.moved_aside = Some((aside, reason));
        let snap = store.snapshot()?;
        Ok((store, report, snap))
    }

    /// Everything the file holds.
    pub fn snapshot(&self) -> Result<Snapshot> {
        Ok(Snapshot {
            secrets: self.secrets()?,
            tracked: self.tracked()?,
            dns: self.dns()?,
            conns: self.conns()?,
            ssl: self.ssl_fds()?,
        })
    }

    /// Every stored secret, opened. Any record that does not open is an error
    /// naming its id (never its contents).
    pub fn secrets(&self) -> Result<Vec<SecretRecord>> {
        let r = self.db.begin_read().map_err(db_err)?;
        let t = r.open_table(SECRETS).map_err(db_err)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            let id = k.value();
            let plain = self
                .key
                .open(&Store::aad(id), v.value())
                .ok_or_else(|| Error::Record {
                    table: "secrets",
                    key: id.to_string(),
                    reason: "does not open with this key (damaged or foreign)".into(),
                })?;
            let rec: SecretRecord = serde_json::from_slice(&plain).map_err(|e| Error::Record {
                table: "secrets",
                key: id.to_string(),
                reason: format!(
                    "unexpected layout at line {} column {}",
                    e.line(),
                    e.column()
                ),
            })?;
            out.push(rec);
        }
        Ok(out)
    }

    fn dns_key(r: &DnsRecord) -> String {
        format!(
            "{} {} {} {} {}",
            r.tgid, r.start_time, r.ip, r.name, r.seen_ns
        )
    }

    /// Stores a batch of answers in one transaction.
    pub fn put_dns(&self, batch: &[DnsRecord]) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        self.write(|w| {
            let mut t = w.open_table(DNS)?;
            for r in batch {
                let v = serde_json::to_vec(r).expect("records serialise");
                t.insert(Store::dns_key(r).as_str(), &v[..])?;
            }
            Ok(())
        })
    }

    /// Drops answers that expired before `older_than_ns` (monotonic). An
    /// answer stays useful after its TTL for connections made under it, so
    /// the caller passes a time well before now.
    pub fn expire_dns(&self, older_than_ns: u64) -> Result<usize> {
        let expired: Vec<String> = self
            .dns()?
            .into_iter()
            .filter(|r| r.expires_ns < older_than_ns)
            .map(|r| Store::dns_key(&r))
            .collect();
        let n = expired.len();
        if n > 0 {
            self.write(|w| {
                let mut t = w.open_table(DNS)?;
                for k in &expired {
                    t.remove(k.as_str())?;
                }
                Ok(())
            })?;
        }
        Ok(n)
    }

    pub fn dns(&self) -> Result<Vec<DnsRecord>> {
        let r = self.db.begin_read().map_err(db_err)?;
        let t = r.open_table(DNS).map_err(db_err)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            out.push(
                serde_json::from_slice(v.value()).map_err(|e| Error::Record {
                    table: "dns",
                    key: k.value().to_string(),
                    reason: e.to_string(),
                })?,
            );
        }
        Ok(out)
    }

    /// Stores connections and drops closed ones, in one transaction.
    pub fn update_conns(&self, put: &[(ConnKey, ConnRecord)], closed: &[ConnKey]) -> Result<()> {
        if put.is_empty() && closed.is_empty() {
            return Ok(());
        }
        self.write(|w| {
            let mut t = w.open_table(CONNS)?;
            for (k, r) in put {
                let v = serde_json::to_vec(r).expect("records serialise");
                t.insert((k.tgid, k.start_time, k.fd), &v[..])?;
            }
            for k in closed {
                t.remove((k.tgid, k.start_time, k.fd))?;
            }
            Ok(())
        })
    }

    pub fn conns(&self) -> Result<Vec<(ConnKey, ConnRecord)>> {
        let r = self.db.begin_read().map_err(db_err)?;
        let t = r.open_table(CONNS).map_err(db_err)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            let (tgid, start_time, fd) = k.value();
            let key = ConnKey {
                tgid,
                start_time,
                fd,
            };
            out.push((
                key,
                serde_json::from_slice(v.value()).map_err(|e| Error::Record {
                    table: "conns",
                    key: format!("{tgid}/{fd}"),
                    reason: e.to_string(),
                })?,
            ));
        }
        Ok(out)
    }

    pub fn put_tracked(&self, t: &TrackedRecord) -> Result<()> {
        let v = serde_json::to_vec(t).expect("records serialise");
        self.write(|w| {
            w.open_table(TRACKED)?.insert(t.id, &v[..])?;
            Ok(())
        })
    }

    pub fn remove_tracked(&self, id: u64) -> Result<()> {
        self.write(|w| {
            w.open_table(TRACKED)?.remove(id)?;
            Ok(())
        })
    }

    pub fn tracked(&self) -> Result<Vec<TrackedRecord>> {
        let r = self.db.begin_read().map_err(db_err)?;
        let t = r.open_table(TRACKED).map_err(db_err)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            out.push(
                serde_json::from_slice(v.value()).map_err(|e| Error::Record {
                    table: "tracked",
                    key: k.value().to_string(),
                    reason: e.to_string(),
                })?,
            );
        }
        Ok(out)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(owner_file(&self.path));
    }
}

/// Brings tables written under schema `from` up to [`SCHEMA_VERSION`].
/// Each step rewrites what changed and nothing else; version 1 is the
/// first layout, so there is no step yet.
fn migrate(_w: &redb::WriteTransaction, from: u32) -> Result<(), String> {
    match from {
        0 => Err("schema 0 was never written by a release".into()),
        _ => Ok(()),
    }
}

/// Every record of a state file, as read at start.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub secrets: Vec<SecretRecord>,
    pub tracked: Vec<TrackedRecord>,
    pub dns: Vec<DnsRecord>,
    pub conns: Vec<(ConnKey, ConnRecord)>,
    pub ssl: Vec<SslRecord>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> Key {
        Key::from_bytes(&[b; 32])
    }

    fn rec(id: u32) -> SecretRecord {
        SecretRecord {
            id,
            name: format!("ns/s/k{id}"),
            placeholder: format!("kloak:ABCDEFGH{id:04}"),
            value: format!("real-value-{id:06}").into_bytes(),
            hosts: vec!["api.example.com".into()],
            ports: vec![443],
            require_wire: id % 2 == 1,
        }
    }

    #[test]
    fn a_secret_record_from_before_require_wire_reads_as_not_requiring_it() {
        let old = r#"{"id":1,"name":"ns/s/k","placeholder":"kloak:ABCDEFGH","value":[49,50],"hosts":[],"ports":[]}"#;
        let r: SecretRecord = serde_json::from_str(old).unwrap();
        assert!(!r.require_wire);
    }

    #[test]
    fn round_trips_every_table_and_survives_reopening() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state.redb");
        {
            let (s, rep) = Store::open(&p, key(1)).unwrap();
            assert!(rep.fresh && rep.moved_aside.is_none());
            s.put_secret(&rec(1)).unwrap();
            s.put_secret(&rec(2)).unwrap();
            s.remove_secret(2).unwrap();
            s.put_dns(&[DnsRecord {
                tgid: 10,
                start_time: 99,
                ip: "10.0.0.1".into(),
                name: "api.example.com".into(),
                seen_ns: 1000,
                expires_ns: 61_000,
            }])
            .unwrap();
            let ck = ConnKey {
                tgid: 10,
                start_time: 99,
                fd: 7,
            };
            s.update_conns(
                &[(
                    ck,
                    ConnRecord {
                        dest: "10.0.0.1:443".into(),
                        connected_ns: 5,
                    },
                )],
                &[],
            )
            .unwrap();
            s.put_tracked(&TrackedRecord {
                id: 77,
                cgroup: "/sys/fs/cgroup/kubepods/x".into(),
                by_pid: false,
                pod: "ns/p".into(),
                secrets: vec![1],
                container: "app".into(),
            })
            .unwrap();
            assert_eq!(
                std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        let (s, rep) = Store::open(&p, key(1)).unwrap();
        assert!(!rep.fresh);
        let secrets = s.secrets().unwrap();
        assert_eq!(secrets, vec![rec(1)]);
        assert_eq!(s.dns().unwrap().len(), 1);
        assert_eq!(s.conns().unwrap()[0].1.dest, "10.0.0.1:443");
        assert_eq!(s.tracked().unwrap()[0].secrets, vec![1]);
        assert_eq!(s.expire_dns(61_001).unwrap(), 1);
        assert!(s.dns().unwrap().is_empty());
        // The value is sealed: it is nowhere in the file in clear.
        drop(s);
        let raw = std::fs::read(&p).unwrap();
        assert!(
            !raw.windows(b"real-value-000001".len())
                .any(|w| w == b"real-value-000001")
        );
        assert!(
            format!("{:?}", rec(1)).contains("redacted")
                && !format!("{:?}", rec(1)).contains("real-value")
        );
    }

    #[test]
    fn a_reboot_drops_what_belonged_to_processes_and_keeps_secrets() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state.redb");
        {
            let (s, _) = Store::open(&p, key(1)).unwrap();
            s.put_secret(&rec(1)).unwrap();
            let ck = ConnKey {
                tgid: 1,
                start_time: 2,
                fd: 3,
            };
            let c = ConnRecord {
                dest: "10.0.0.1:443".into(),
                connected_ns: 1,
            };
            s.update_conns(&[(ck, c)], &[]).unwrap();
            let w = s.db.begin_write().unwrap();
            w.open_table(META)
                .unwrap()
                .insert("boot_id", &b"another boot"[..])
                .unwrap();
            w.commit().unwrap();
        }
        let (s, rep) = Store::open(&p, key(1)).unwrap();
        assert!(rep.rebooted && !rep.fresh);
        assert!(s.conns().unwrap().is_empty());
        assert_eq!(s.secrets().unwrap().len(), 1);
    }

    #[test]
    fn batches_apply_in_one_transaction_and_prune_dead_processes() {
        let d = tempfile::tempdir().unwrap();
        let (s, _) = Store::open(&d.path().join("s.redb"), key(1)).unwrap();
        let ck = |tgid| ConnKey {
            tgid,
            start_time: 5,
            fd: 3,
        };
        let c = ConnRecord {
            dest: "10.0.0.1:443".into(),
            connected_ns: 1,
        };
        let b = Batch {
            secrets: vec![rec(1), rec(2)],
            removed_secrets: vec![2],
            conns: vec![(ck(1), c.clone()), (ck(2), c.clone())],
            closed: vec![ck(2)],
            ssl: vec![SslRecord {
                tgid: 1,
                start_time: 5,
                ptr: 0x5555_0000,
                fd: 3,
            }],
            dns: vec![DnsRecord {
                tgid: 1,
                start_time: 5,
                ip: "10.0.0.1".into(),
                name: "a.test".into(),
                seen_ns: 1,
                expires_ns: 2,
            }],
            ..Default::default()
        };
        assert_eq!(b.len(), 8);
        s.apply(&b).unwrap();
        assert_eq!(s.secrets().unwrap(), vec![rec(1)]);
        assert_eq!(s.conns().unwrap().len(), 1);
        assert_eq!(s.ssl_fds().unwrap()[0].fd, 3);
        assert_eq!(s.prune_processes(|tgid, _| tgid != 1).unwrap(), 3);
        assert!(s.ssl_fds().unwrap().is_empty());
        assert!(s.conns().unwrap().is_empty() && s.dns().unwrap().is_empty());
    }

    #[test]
    fn a_second_agent_is_refused_naming_the_holder() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state.redb");
        let (_s, _) = Store::open(&p, key(1)).unwrap();
        let e = match Store::open(&p, key(1)) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("second open succeeded"),
        };
        assert!(
            e.contains("in use by another agent")
                && e.contains(&format!("pid {}", std::process::id())),
            "{e}"
        );
    }

    fn moved(p: &Path, k: Key) -> (Store, String) {
        let (s, rep) = Store::open(p, k).unwrap();
        let (aside, reason) = rep.moved_aside.expect("moved aside");
        assert!(aside.exists());
        assert!(rep.fresh);
        assert!(s.secrets().unwrap().is_empty());
        (s, reason)
    }

    #[test]
    fn a_wrong_key_moves_the_file_aside_and_starts_empty() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state.redb");
        Store::open(&p, key(1))
            .unwrap()
            .0
            .put_secret(&rec(1))
            .unwrap();
        let (_s, reason) = moved(&p, key(2));
        assert!(reason.contains("another key"), "{reason}");
    }

    #[test]
    fn corrupt_and_truncated_files_are_moved_aside() {
        for damage in ["garbage", "truncate", "flip"] {
            let d = tempfile::tempdir().unwrap();
            let p = d.path().join("state.redb");
            {
                let (s, _) = Store::open(&p, key(1)).unwrap();
                for i in 0..50 {
                    s.put_secret(&rec(i)).unwrap();
                }
            }
            let mut bytes = std::fs::read(&p).unwrap();
            match damage {
                "garbage" => bytes = b"this is not a redb file at all".repeat(100),
                "truncate" => bytes.truncate(bytes.len() / 3),
                _ => {
                    // Damage every record's ciphertext region but keep the header.
                    for b in bytes.iter_mut().skip(4096) {
                        *b ^= 0x5a;
                    }
                }
            }
            std::fs::write(&p, &bytes).unwrap();
            let (s, reason) = moved(&p, key(1));
            assert!(!reason.contains("real-value"), "{reason}");
            s.put_secret(&rec(1)).unwrap();
            assert_eq!(
                s.secrets().unwrap().len(),
                1,
                "{damage}: the new file works"
            );
        }
    }

    #[test]
    fn a_newer_schema_is_not_read() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state.redb");
        {
            let (s, _) = Store::open(&p, key(1)).unwrap();
            let w = s.db.begin_write().unwrap();
            w.open_table(META)
                .unwrap()
                .insert("schema_version", &(SCHEMA_VERSION + 1).to_le_bytes()[..])
                .unwrap();
            w.commit().unwrap();
        }
        let (_s, reason) = moved(&p, key(1));
        assert!(reason.contains("newer Kloak"), "{reason}");
    }

    #[test]
    fn a_record_that_does_not_open_moves_the_file_aside() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state.redb");
        {
            let (s, _) = Store::open(&p, key(1)).unwrap();
            s.put_secret(&rec(1)).unwrap();
            // One sealed value damaged in place.
            let w = s.db.begin_write().unwrap();
            {
                let mut t = w.open_table(SECRETS).unwrap();
                t.insert(1u32, &b"not a sealed record"[..]).unwrap();
            }
            w.commit().unwrap();
        }
        let (s, rep, snap) = Store::open_loaded(&p, key(1)).unwrap();
        let (aside, reason) = rep.moved_aside.expect("moved aside");
        assert!(aside.exists());
        assert!(reason.contains("secrets"), "{reason}");
        assert!(!reason.contains("real-value"), "{reason}");
        assert!(snap.secrets.is_empty());
        s.put_secret(&rec(2)).unwrap();
        assert_eq!(s.snapshot().unwrap().secrets.len(), 1);
    }
}
