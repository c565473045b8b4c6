//! The host's durable record of the migrations it took part in, in an embedded
//! transactional store (redb: pure Rust, ACID, every commit fsynced).
//!
//! What it is for: a destination answers "did you commit migration X?" from here, after a
//! restart too, so a source never resumes its paused copy of a VM that may have run on the
//! destination. The rules that make that safe:
//! - the destination writes `Preparing` before it answers `Prepared` (so any migration that
//!   could reach `Commit` has a record), and `Committed` before it runs the VM;
//! - after a restart, a record still `Preparing` becomes `Discarded` (that copy never ran:
//!   running needs `Committed` first), and `Committed`/`Resumed` become `Lost` (the VM lived
//!   in the hostd that died; it may have run, so the source's copy is stale);
//! - the store has an identity (a UUID made when it is created). A source that hears
//!   "unknown migration" trusts it only from the store it talked to during the migration:
//!   from a replaced or wiped store it proves nothing.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::migration::MigrationId;

/// Migration records by ID: postcard-encoded [`MigrationRecord`]s.
const MIGRATIONS: TableDefinition<u128, &[u8]> = TableDefinition::new("migrations");
/// Store metadata: the identity and the record format version.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const META_ID: &str = "id";
const META_FORMAT: &str = "format";
/// Version of the record encoding (postcard is not self-describing: every change bumps it).
const FORMAT: u32 = 1;
/// Finished records are dropped this long after their last change.
const RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// Where a migration this host received stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// The empty VM is built and memory arrives; the VM has never run here.
    Preparing,
    /// `Commit` arrived: from now on the VM may run here and only here.
    Committed,
    /// The VM runs (or is kept paused) here.
    Resumed,
    /// The copy was dropped before any commit; it never ran here.
    Discarded,
    /// Committed here, then lost with the hostd process that held it: it may have run, so
    /// the source's paused copy is stale.
    Lost,
}

impl Phase {
    /// Whether the record can still change in this process's life.
    fn is_open(self) -> bool {
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
    /// The source host.
    pub source: String,
    /// Where it stands.
    pub phase: Phase,
    /// From receiving `Commit` to the vCPUs running, once resumed (the destination's share
    /// of the guest's pause).
    pub resumed_after_commit_ms: Option<f64>,
    /// Last change, milliseconds since the Unix epoch.
    pub updated_unix_ms: u64,
}

impl MigrationRecord {
    /// A new record in `phase`, stamped now.
    pub fn new(id: MigrationId, vm: &str, source: &str, phase: Phase) -> Self {
        MigrationRecord {
            id,
            vm: vm.to_string(),
            source: source.to_string(),
            phase,
            resumed_after_commit_ms: None,
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
        "cannot open the migration journal {path}; check the state directory, and that no other hostd uses it"
    )]
    Open {
        /// The store file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: redb::DatabaseError,
    },
    /// A transaction failed.
    #[error("migration journal {path}: {operation} failed")]
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
    #[error("migration journal {path}: record {id} is damaged")]
    Damaged {
        /// The store file.
        path: PathBuf,
        /// The record's key.
        id: MigrationId,
        /// Cause.
        #[source]
        source: postcard::Error,
    },
    /// The store was written by an incompatible version of Ferry.
    #[error(
        "migration journal {path} has record format {found}, this hostd reads format {FORMAT}; upgrade hostd or move the file away"
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

    /// Writes `record` durably: when this returns, it survives a crash.
    pub fn record(&self, record: &MigrationRecord) -> Result<(), JournalError> {
        let bytes = postcard::to_stdvec(record).map_err(|source| JournalError::Store {
            path: self.path.clone(),
            operation: "encode",
            source: Box::new(source),
        })?;
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
        self.decode(id, value.value()).map(Some)
    }

    fn decode(&self, id: MigrationId, bytes: &[u8]) -> Result<MigrationRecord, JournalError> {
        postcard::from_bytes(bytes).map_err(|source| JournalError::Damaged {
            path: self.path.clone(),
            id,
            source,
        })
    }

    /// Every record, oldest key first.
    pub fn all(&self) -> Result<Vec<MigrationRecord>, JournalError> {
        let txn = self.db.begin_read().map_err(self.store_error("begin"))?;
        let table = match txn.open_table(MIGRATIONS) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(self.store_error("open")(e)),
        };
        let mut records = Vec::new();
        for entry in table.iter().map_err(self.store_error("read"))? {
            let (key, value) = entry.map_err(self.store_error("read"))?;
            records.push(self.decode(Uuid::from_u128(key.value()), value.value())?);
        }
        Ok(records)
    }

    /// After a hostd start: settles every record the previous process left open (see the
    /// module docs) and drops finished records past the retention time, in one transaction.
    /// Returns the records it changed.
    pub fn recover(&self) -> Result<Vec<MigrationRecord>, JournalError> {
        let records = self.all()?;
        let now = now_unix_ms();
        let txn = self.db.begin_write().map_err(self.store_error("begin"))?;
        let mut changed = Vec::new();
        {
            let mut table = txn
                .open_table(MIGRATIONS)
                .map_err(self.store_error("open"))?;
            for record in records {
                let settled = match record.phase {
                    Phase::Preparing => Some(Phase::Discarded),
                    Phase::Committed | Phase::Resumed => Some(Phase::Lost),
                    Phase::Discarded | Phase::Lost => None,
                };
                let key = record.id.as_u128();
                match settled {
                    Some(phase) => {
                        let next = record.with_phase(phase);
                        let bytes =
                            postcard::to_stdvec(&next).map_err(|source| JournalError::Store {
                                path: self.path.clone(),
                                operation: "encode",
                                source: Box::new(source),
                            })?;
                        table
                            .insert(key, bytes.as_slice())
                            .map_err(self.store_error("write"))?;
                        changed.push(next);
                    }
                    None => {
                        let age = now.saturating_sub(record.updated_unix_ms);
                        if !record.phase.is_open() && age > RETENTION.as_millis() as u64 {
                            table.remove(key).map_err(self.store_error("remove"))?;
                        }
                    }
                }
            }
        }
        txn.commit().map_err(self.store_error("commit"))?;
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopening_and_the_identity_is_stable() {
        let dir = tempfile::tempdir().unwrap();
        let id = MigrationId::new_v4();
        let first = {
            let journal = Journal::open(dir.path()).unwrap();
            let record = MigrationRecord::new(id, "vm1", "alpha", Phase::Committed);
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

    /// The recovery table: open phases are settled as the module docs say, settled ones
    /// stay, and only finished records past the retention time are dropped.
    #[test]
    fn recovery_settles_what_the_previous_process_left_open() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        let mut ids = Vec::new();
        for phase in [
            Phase::Preparing,
            Phase::Committed,
            Phase::Resumed,
            Phase::Discarded,
            Phase::Lost,
        ] {
            let id = MigrationId::new_v4();
            journal
                .record(&MigrationRecord::new(id, "vm", "alpha", phase))
                .unwrap();
            ids.push((id, phase));
        }
        let mut ancient = MigrationRecord::new(MigrationId::new_v4(), "old", "a", Phase::Discarded);
        ancient.updated_unix_ms = 1;
        journal.record(&ancient).unwrap();
        drop(journal);

        let journal = Journal::open(dir.path()).unwrap();
        let changed = journal.recover().unwrap();
        assert_eq!(changed.len(), 3);
        let expected = [
            Phase::Discarded,
            Phase::Lost,
            Phase::Lost,
            Phase::Discarded,
            Phase::Lost,
        ];
        for ((id, before), after) in ids.iter().zip(expected) {
            assert_eq!(
                journal.get(*id).unwrap().unwrap().phase,
                after,
                "{before:?} after a restart"
            );
        }
        assert_eq!(journal.get(ancient.id).unwrap(), None, "past retention");
        // A second recovery changes nothing.
        assert!(journal.recover().unwrap().is_empty());
    }

    #[test]
    fn a_second_process_cannot_open_the_same_journal() {
        let dir = tempfile::tempdir().unwrap();
        let _held = Journal::open(dir.path()).unwrap();
        let error = Journal::open(dir.path()).unwrap_err();
        assert!(error.to_string().contains("no other hostd"), "{error}");
    }
}
