//! hostd's durable records, in an embedded transactional store (redb: pure Rust, ACID, every
//! commit fsynced): the migrations this host took part in, and the inventory of its VMs.
//!
//! Migrations. A destination answers "did you commit migration X?" from here, after a
//! restart too, so a source never resumes its paused copy of a VM that may have run on the
//! destination. The rules that make that safe:
//! - the destination writes `Preparing` before it answers `Prepared` (so any migration that
//!   could reach `Commit` has a record), and `Committed` before it runs the VM;
//! - after a restart, [`settle`] decides what every open record means, by whether the VM's
//!   VMM process is still there (table in `docs/design.md`);
//! - the store has an identity (a UUID made when it is created). A source that hears
//!   "unknown migration" trusts it only from the store it talked to during the migration:
//!   from a replaced or wiped store it proves nothing.
//!
//! Inventory. Every VM this host holds, with what only hostd knows (network, IP, a stale
//! copy): a restarted hostd finds each VM's VMM process again, and reports a VM whose
//! process is gone as crashed rather than forgetting it.
//!
//! Records are JSON, so a newer hostd reads an older one's records (fields it added take
//! their defaults).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::migration::MigrationId;
use crate::vm_actor::VmInfo;

/// Migration records by ID.
const MIGRATIONS: TableDefinition<u128, &[u8]> = TableDefinition::new("migrations");
/// VM records by name.
const VMS: TableDefinition<&str, &[u8]> = TableDefinition::new("vms");
/// Store metadata: the identity and the record format version.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const META_ID: &str = "id";
const META_FORMAT: &str = "format";
/// The host's maintenance mode, while it is on.
const META_MAINTENANCE: &str = "maintenance";
const META_EVACUATION: &str = "evacuation";
/// Version of the store's layout (tables and keys); records themselves are JSON.
const FORMAT: u32 = 1;
/// Finished migration records are dropped this long after their last change.
const RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// Which side of a migration this host was.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The VM came here.
    #[default]
    Destination,
    /// The VM left from here.
    Source,
}

/// Where a migration stands, as this host recorded it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Destination: the empty VM is built and memory arrives; the VM has never run here.
    /// Source: copying, before `Commit` was sent.
    Preparing,
    /// Destination: `Commit` arrived: from now on the VM may run here and only here.
    /// Source: `Commit` was sent: the VM must not resume here without a durable "not
    /// committed" from the destination.
    Committed,
    /// Destination: the VM runs (or is kept paused) here. Source: the destination has it.
    Resumed,
    /// The copy was dropped before any commit (destination), or the VM stayed (source).
    Discarded,
    /// Destination: committed here, then lost with its VMM process: it may have run, so the
    /// source's paused copy is stale. Source: the paused copy left here is stale.
    Lost,
}

impl Phase {
    /// Whether the record can still change.
    pub fn is_open(self) -> bool {
        matches!(self, Phase::Preparing | Phase::Committed)
    }
}

/// One migration as this host recorded it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrationRecord {
    /// The migration.
    pub id: MigrationId,
    /// The VM.
    pub vm: String,
    /// Which side this host was.
    #[serde(default)]
    pub role: Role,
    /// The other host.
    pub peer: String,
    /// Where it stands.
    pub phase: Phase,
    /// Whether the VM was running when the migration began (it is resumed after a commit,
    /// or after a rollback, only then).
    #[serde(default = "yes")]
    pub was_running: bool,
    /// Source: the destination journal that accepted the migration.
    #[serde(default)]
    pub peer_journal: Option<Uuid>,
    /// From receiving `Commit` to the vCPUs running, once resumed (the destination's share
    /// of the guest's pause).
    #[serde(default)]
    pub resumed_after_commit_ms: Option<f64>,
    /// Destination of a storage migration: the images it created, removed if the arrival is
    /// discarded (by this process, or by a restarted hostd settling the record).
    #[serde(default)]
    pub created_images: Vec<std::path::PathBuf>,
    /// Source of a storage migration: its images, removed once the destination owns the VM
    /// (by this process, or by a restarted hostd that learns the outcome by asking); empty
    /// when they stay (compute only, or `--keep-source-disks`).
    #[serde(default)]
    pub source_images: Vec<std::path::PathBuf>,
    /// Last change, milliseconds since the Unix epoch.
    pub updated_unix_ms: u64,
}

fn yes() -> bool {
    true
}

impl MigrationRecord {
    /// A new record in `phase`, stamped now.
    pub fn new(id: MigrationId, vm: &str, (role, peer): (Role, &str), phase: Phase) -> Self {
        MigrationRecord {
            id,
            vm: vm.to_string(),
            role,
            peer: peer.to_string(),
            phase,
            was_running: true,
            peer_journal: None,
            resumed_after_commit_ms: None,
            created_images: Vec::new(),
            source_images: Vec::new(),
            updated_unix_ms: now_unix_ms(),
        }
    }

    /// The same record moved to `phase`, stamped now.
    pub fn with_phase(&self, phase: Phase) -> Self {
        MigrationRecord {
            phase,
            updated_unix_ms: now_unix_ms(),
            ..self.clone()
        }
    }
}

/// What an open record means after a restart, given whether the VM's VMM process is still
/// running here. `None`: it stays as it is, for the caller to resolve (a source whose
/// commit went out must still ask the destination).
pub fn settle(record: &MigrationRecord, vmm_alive: bool) -> Option<Phase> {
    match (record.role, record.phase, vmm_alive) {
        // Never committed here: it never ran here, and it never will.
        (Role::Destination, Phase::Preparing, _) => Some(Phase::Discarded),
        // Committed: the VM is ours. Still running (or ready to): keep it; gone: it may
        // have run before it went, so the source's copy is stale.
        (Role::Destination, Phase::Committed | Phase::Resumed, true) => Some(Phase::Resumed),
        (Role::Destination, Phase::Committed | Phase::Resumed, false) => Some(Phase::Lost),
        // Source before the commit: the migration is over, the VM stays here.
        (Role::Source, Phase::Preparing, _) => Some(Phase::Discarded),
        // Source after the commit: only the destination can say.
        (Role::Source, Phase::Committed, _) => None,
        (_, Phase::Discarded | Phase::Lost, _) | (Role::Source, Phase::Resumed, _) => None,
    }
}

/// The host is in maintenance mode: it takes no new VMs and no incoming migrations.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaintenanceRecord {
    /// Since when, milliseconds since the Unix epoch.
    pub since_unix_ms: u64,
}

/// An evacuation the operator asked for and that has not finished: what a restarted hostd
/// needs to carry it on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvacuationRecord {
    /// When it was asked for, milliseconds since the Unix epoch.
    pub since_unix_ms: u64,
    /// Options for every migration.
    pub options: crate::migration::MigrationOptions,
    /// Where disks that no destination shares move to.
    pub datastore: Option<String>,
    /// The cap all of its migrations share, bytes per second.
    pub total_bandwidth: Option<u64>,
}

/// A VM this host holds, as hostd knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// The VM as last seen (identity, shape, network, IP, VMM process).
    pub info: VmInfo,
    /// The paused copy a lost switch-over left: it must not be resumed as usual.
    #[serde(default)]
    pub stale: bool,
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A journal operation failed.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The store cannot be opened (missing directory, no permission, another hostd has it).
    #[error(
        "cannot open the host journal {path}; check the state directory, and that no other hostd uses it"
    )]
    Open {
        /// The store file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: redb::DatabaseError,
    },
    /// A transaction failed.
    #[error("host journal {path}: {operation} failed")]
    Store {
        /// The store file.
        path: PathBuf,
        /// What was being done.
        operation: &'static str,
        /// Cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A record cannot be decoded.
    #[error("host journal {path}: record {key} is damaged")]
    Damaged {
        /// The store file.
        path: PathBuf,
        /// The record's key.
        key: String,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// The store was written by an incompatible version of Ferry.
    #[error(
        "host journal {path} has format {found}, this hostd reads format {FORMAT}; upgrade hostd or move the file away"
    )]
    Format {
        /// The store file.
        path: PathBuf,
        /// The format found.
        found: u32,
    },
}

/// The journal of one host.
#[derive(Debug)]
pub struct Journal {
    db: Database,
    path: PathBuf,
    id: Uuid,
}

impl Journal {
    /// Opens (or creates) the journal in `state_dir`.
    pub fn open(state_dir: &Path) -> Result<Journal, JournalError> {
        let path = state_dir.join("journal.redb");
        let db = Database::create(&path).map_err(|source| JournalError::Open {
            path: path.clone(),
            source,
        })?;
        let mut journal = Journal {
            db,
            path,
            id: Uuid::nil(),
        };
        journal.id = journal.identity()?;
        Ok(journal)
    }

    /// This store's identity, made when it was created.
    pub fn id(&self) -> Uuid {
        self.id
    }

    fn store_error<E>(&self, operation: &'static str) -> impl FnOnce(E) -> JournalError + '_
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        move |source| JournalError::Store {
            path: self.path.clone(),
            operation,
            source: Box::new(source),
        }
    }

    /// Reads the identity and format, writing them on first use.
    fn identity(&self) -> Result<Uuid, JournalError> {
        let txn = self.db.begin_write().map_err(self.store_error("begin"))?;
        let id = {
            let mut meta = txn.open_table(META).map_err(self.store_error("open"))?;
            let format = meta
                .get(META_FORMAT)
                .map_err(self.store_error("read"))?
                .map(|v| {
                    let bytes: [u8; 4] = v.value().try_into().unwrap_or_default();
                    u32::from_le_bytes(bytes)
                });
            if let Some(found) = format
                && found != FORMAT
            {
                return Err(JournalError::Format {
                    path: self.path.clone(),
                    found,
                });
            }
            let existing = meta
                .get(META_ID)
                .map_err(self.store_error("read"))?
                .and_then(|v| Uuid::from_slice(v.value()).ok());
            match existing {
                Some(id) => id,
                None => {
                    let id = Uuid::new_v4();
                    meta.insert(META_ID, id.as_bytes().as_slice())
                        .map_err(self.store_error("write"))?;
                    meta.insert(META_FORMAT, FORMAT.to_le_bytes().as_slice())
                        .map_err(self.store_error("write"))?;
                    id
                }
            }
        };
        txn.commit().map_err(self.store_error("commit"))?;
        Ok(id)
    }

    fn encode<T: Serialize>(&self, value: &T) -> Result<Vec<u8>, JournalError> {
        serde_json::to_vec(value).map_err(|source| JournalError::Store {
            path: self.path.clone(),
            operation: "encode",
            source: Box::new(source),
        })
    }

    fn decode<T: DeserializeOwned>(&self, key: String, bytes: &[u8]) -> Result<T, JournalError> {
        serde_json::from_slice(bytes).map_err(|source| JournalError::Damaged {
            path: self.path.clone(),
            key,
            source,
        })
    }

    /// Writes `record` durably: when this returns, it survives a crash.
    pub fn record(&self, record: &MigrationRecord) -> Result<(), JournalError> {
        let bytes = self.encode(record)?;
        let txn = self.db.begin_write().map_err(self.store_error("begin"))?;
        {
            let mut table = txn
                .open_table(MIGRATIONS)
                .map_err(self.store_error("open"))?;
            table
                .insert(record.id.as_u128(), bytes.as_slice())
                .map_err(self.store_error("write"))?;
        }
        txn.commit().map_err(self.store_error("commit"))
    }

    /// The record of migration `id`, if any.
    pub fn get(&self, id: MigrationId) -> Result<Option<MigrationRecord>, JournalError> {
        let txn = self.db.begin_read().map_err(self.store_error("begin"))?;
        let table = match txn.open_table(MIGRATIONS) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(self.store_error("open")(e)),
        };
        let Some(value) = table.get(id.as_u128()).map_err(self.store_error("read"))? else {
            return Ok(None);
        };
        self.decode(id.to_string(), value.value()).map(Some)
    }

    /// Every migration record, oldest key first.
    pub fn migrations(&self) -> Result<Vec<MigrationRecord>, JournalError> {
        let txn = self.db.begin_read().map_err(self.store_error("begin"))?;
        let table = match txn.open_table(MIGRATIONS) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(self.store_error("open")(e)),
        };
        let mut records = Vec::new();
        for entry in table.iter().map_err(self.store_error("read"))? {
            let (key, value) = entry.map_err(self.store_error("read"))?;
            records.push(self.decode(Uuid::from_u128(key.value()).to_string(), value.value())?);
        }
        Ok(records)
    }

    /// Drops finished migration records older than the retention time.
    pub fn prune(&self) -> Result<usize, JournalError> {
        let now = now_unix_ms();
        let old: Vec<u128> = self
            .migrations()?
            .into_iter()
            .filter(|r| {
                !r.phase.is_open()
                    && now.saturating_sub(r.updated_unix_ms) > RETENTION.as_millis() as u64
            })
            .map(|r| r.id.as_u128())
            .collect();
        let txn = self.db.begin_write().map_err(self.store_error("begin"))?;
        {
            let mut table = txn
                .open_table(MIGRATIONS)
                .map_err(self.store_error("open"))?;
            for key in &old {
                table.remove(*key).map_err(self.store_error("remove"))?;
            }
        }
        txn.commit().map_err(self.store_error("commit"))?;
        Ok(old.len())
    }

    /// Writes a migration's record and a VM's record together, durably, in one transaction:
    /// the destination's commit, after which a crash must find the VM it runs on record
    /// (with its disks and network), not only the migration.
    pub fn record_with_vm(
        &self,
        record: &MigrationRecord,
        vm: &VmRecord,
    ) -> Result<(), JournalError> {
        let migration = self.encode(record)?;
        let machine = self.encode(vm)?;
        let txn = self.db.begin_write().map_err(self.store_error("begin"))?;
        {
            let mut table = txn
                .open_table(MIGRATIONS)
                .map_err(self.store_error("open"))?;
            table
                .insert(record.id.as_u128(), migration.as_slice())
                .map_err(self.store_error("write"))?;
            let mut vms = txn.open_table(VMS).map_err(self.store_error("open"))?;
            vms.insert(vm.info.name.as_str(), machine.as_slice())
                .map_err(self.store_error("write"))?;
        }
        txn.commit().map_err(self.store_error("commit"))
    }

    /// Records durably that the host is in maintenance (`Some`) or not (`None`).
    pub fn set_maintenance(&self, mode: Option<&MaintenanceRecord>) -> Result<(), JournalError> {
        self.set_meta(META_MAINTENANCE, mode)
    }

    /// The maintenance mode recorded, if the host is in it.
    pub fn maintenance(&self) -> Result<Option<MaintenanceRecord>, JournalError> {
        self.meta(META_MAINTENANCE)
    }

    /// Records durably the evacuation under way (`Some`), or that none is (`None`).
    pub fn set_evacuation(&self, record: Option<&EvacuationRecord>) -> Result<(), JournalError> {
        self.set_meta(META_EVACUATION, record)
    }

    /// The evacuation recorded as under way, if any.
    pub fn evacuation(&self) -> Result<Option<EvacuationRecord>, JournalError> {
        self.meta(META_EVACUATION)
    }

    fn set_meta<T: Serialize>(&self, key: &str, value: Option<&T>) -> Result<(), JournalError> {
        let bytes = value.map(|v| self.encode(v)).transpose()?;
        let txn = self.db.begin_write().map_err(self.store_error("begin"))?;
        {
            let mut meta = txn.open_table(META).map_err(self.store_error("open"))?;
            match &bytes {
                Some(bytes) => meta
                    .insert(key, bytes.as_slice())
                    .map(drop)
                    .map_err(self.store_error("write"))?,
                None => meta
                    .remove(key)
                    .map(drop)
                    .map_err(self.store_error("remove"))?,
            }
        }
        txn.commit().map_err(self.store_error("commit"))
    }

    fn meta<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, JournalError> {
        let txn = self.db.begin_read().map_err(self.store_error("begin"))?;
        let meta = txn.open_table(META).map_err(self.store_error("open"))?;
        let Some(value) = meta.get(key).map_err(self.store_error("read"))? else {
            return Ok(None);
        };
        self.decode(key.into(), value.value()).map(Some)
    }

    /// Writes (or replaces) the record of a VM, durably.
    pub fn put_vm(&self, record: &VmRecord) -> Result<(), JournalError> {
        let bytes = self.encode(record)?;
        let txn = self.db.begin_write().map_err(self.store_error("begin"))?;
        {
            let mut table = txn.open_table(VMS).map_err(self.store_error("open"))?;
            table
                .insert(record.info.name.as_str(), bytes.as_slice())
                .map_err(self.store_error("write"))?;
        }
        txn.commit().map_err(self.store_error("commit"))
    }

    /// Forgets a VM (stopped, or gone to another host).
    pub fn remove_vm(&self, name: &str) -> Result<(), JournalError> {
        let txn = self.db.begin_write().map_err(self.store_error("begin"))?;
        {
            let mut table = txn.open_table(VMS).map_err(self.store_error("open"))?;
            table.remove(name).map_err(self.store_error("remove"))?;
        }
        txn.commit().map_err(self.store_error("commit"))
    }

    /// Every VM record.
    pub fn vms(&self) -> Result<Vec<VmRecord>, JournalError> {
        let txn = self.db.begin_read().map_err(self.store_error("begin"))?;
        let table = match txn.open_table(VMS) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(self.store_error("open")(e)),
        };
        let mut records = Vec::new();
        for entry in table.iter().map_err(self.store_error("read"))? {
            let (key, value) = entry.map_err(self.store_error("read"))?;
            records.push(self.decode(key.value().to_string(), value.value())?);
        }
        Ok(records)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::Lifecycle;

    fn record(role: Role, phase: Phase) -> MigrationRecord {
        MigrationRecord::new(MigrationId::new_v4(), "vm", (role, "peer"), phase)
    }

    #[test]
    fn records_survive_reopening_and_the_identity_is_stable() {
        let dir = tempfile::tempdir().unwrap();
        let id = MigrationId::new_v4();
        let first = {
            let journal = Journal::open(dir.path()).unwrap();
            let record =
                MigrationRecord::new(id, "vm1", (Role::Destination, "alpha"), Phase::Committed);
            journal.record(&record).unwrap();
            assert_eq!(journal.get(id).unwrap(), Some(record));
            journal.id()
        };
        let journal = Journal::open(dir.path()).unwrap();
        assert_eq!(journal.id(), first, "same store, same identity");
        assert_eq!(journal.get(id).unwrap().unwrap().phase, Phase::Committed);
        assert_eq!(journal.get(MigrationId::new_v4()).unwrap(), None);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(Journal::open(other.path()).unwrap().id(), first);
    }

    #[test]
    fn maintenance_mode_survives_reopening_until_it_is_ended() {
        let dir = tempfile::tempdir().unwrap();
        let mode = MaintenanceRecord { since_unix_ms: 42 };
        {
            let journal = Journal::open(dir.path()).unwrap();
            assert_eq!(journal.maintenance().unwrap(), None);
            journal.set_maintenance(Some(&mode)).unwrap();
        }
        let journal = Journal::open(dir.path()).unwrap();
        assert_eq!(journal.maintenance().unwrap(), Some(mode));
        let evacuation = EvacuationRecord {
            since_unix_ms: 43,
            options: crate::migration::MigrationOptions::default(),
            datastore: Some("local".into()),
            total_bandwidth: Some(100_000_000),
        };
        assert_eq!(journal.evacuation().unwrap(), None);
        journal.set_evacuation(Some(&evacuation)).unwrap();
        drop(journal);
        let journal = Journal::open(dir.path()).unwrap();
        assert_eq!(journal.evacuation().unwrap(), Some(evacuation));
        journal.set_evacuation(None).unwrap();
        assert_eq!(journal.evacuation().unwrap(), None);
        journal.set_maintenance(None).unwrap();
        drop(journal);
        assert_eq!(
            Journal::open(dir.path()).unwrap().maintenance().unwrap(),
            None
        );
    }

    /// The whole table of what an open record means after a restart.
    #[test]
    fn settling_after_a_restart() {
        use Phase as P;
        use Role as R;
        let cases = [
            (R::Destination, P::Preparing, true, Some(P::Discarded)),
            (R::Destination, P::Preparing, false, Some(P::Discarded)),
            (R::Destination, P::Committed, true, Some(P::Resumed)),
            (R::Destination, P::Committed, false, Some(P::Lost)),
            (R::Destination, P::Resumed, true, Some(P::Resumed)),
            (R::Destination, P::Resumed, false, Some(P::Lost)),
            (R::Destination, P::Discarded, false, None),
            (R::Destination, P::Lost, true, None),
            (R::Source, P::Preparing, true, Some(P::Discarded)),
            (R::Source, P::Preparing, false, Some(P::Discarded)),
            (R::Source, P::Committed, true, None),
            (R::Source, P::Committed, false, None),
            (R::Source, P::Resumed, false, None),
            (R::Source, P::Discarded, true, None),
            (R::Source, P::Lost, true, None),
        ];
        for (role, phase, alive, expected) in cases {
            assert_eq!(
                settle(&record(role, phase), alive),
                expected,
                "{role:?} {phase:?} vmm alive {alive}"
            );
        }
    }

    #[test]
    fn only_finished_records_past_retention_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        let mut ancient = record(Role::Destination, Phase::Discarded);
        ancient.updated_unix_ms = 1;
        let mut open = record(Role::Source, Phase::Committed);
        open.updated_unix_ms = 1;
        let fresh = record(Role::Destination, Phase::Lost);
        for r in [&ancient, &open, &fresh] {
            journal.record(r).unwrap();
        }
        assert_eq!(journal.prune().unwrap(), 1);
        assert_eq!(journal.get(ancient.id).unwrap(), None);
        assert!(journal.get(open.id).unwrap().is_some(), "open records stay");
        assert!(journal.get(fresh.id).unwrap().is_some());
    }

    #[test]
    fn vm_records_are_kept_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        let info = VmInfo {
            name: "web".into(),
            uuid: Uuid::new_v4().to_string(),
            mac: "52:54:00:00:00:01".into(),
            host: "alpha".into(),
            state: Lifecycle::Running,
            vcpus: 1,
            memory: 64 << 20,
            guest: "counter".into(),
            network: Some("vmnet".into()),
            ip: None,
            throttle_pct: 0,
            guest_progress: 0,
            guest_failures: 0,
            guest_exits: Default::default(),
            console_bytes: 0,
            vmm_pid: Some(42),
            vmm_started_unix_ms: Some(7),
            crash: None,
            disks: vec![crate::datastore::VmDisk::describe(
                &crate::datastore::DiskRef {
                    datastore: "shared".into(),
                    file: "web.raw".into(),
                    read_only: false,
                },
                None,
            )],
            nics: Vec::new(),
        };
        let record = VmRecord { info, stale: false };
        journal.put_vm(&record).unwrap();
        let mut stale = record.clone();
        stale.stale = true;
        journal.put_vm(&stale).unwrap();
        assert_eq!(journal.vms().unwrap(), vec![stale]);
        journal.remove_vm("web").unwrap();
        assert!(journal.vms().unwrap().is_empty());
        // A commit writes both records at once, and both survive a reopen.
        let id = MigrationId::new_v4();
        let committed =
            MigrationRecord::new(id, "web", (Role::Destination, "alpha"), Phase::Committed);
        journal.record_with_vm(&committed, &record).unwrap();
        drop(journal);
        let journal = Journal::open(dir.path()).unwrap();
        assert_eq!(journal.vms().unwrap(), vec![record]);
        assert_eq!(
            journal.get(id).unwrap().map(|r| r.phase),
            Some(Phase::Committed)
        );
    }

    #[test]
    fn a_second_process_cannot_open_the_same_journal() {
        let dir = tempfile::tempdir().unwrap();
        let _held = Journal::open(dir.path()).unwrap();
        let error = Journal::open(dir.path()).unwrap_err();
        assert!(error.to_string().contains("no other hostd"), "{error}");
    }
}
