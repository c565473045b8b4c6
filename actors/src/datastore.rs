//! Datastores: directories on a host that hold VM disk images, named in the cluster's
//! config. Two hosts that list the same datastore name claim to share it; the claim is
//! checked with an identity file in the datastore's root, a UUID the first host to open the
//! datastore writes. A compute-only migration needs the destination to see the same identity
//! for every disk's datastore, or it is refused at verify.
//!
//! A VM names its disks as `(datastore, file)`, never by path: a datastore may be mounted at
//! another path on another host, and each host resolves the name against its own config.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Name of the identity file in a datastore's root.
pub const IDENTITY_FILE: &str = ".ferry-datastore";

/// A datastore as this host has it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Datastore {
    /// Name, as in the config.
    pub name: String,
    /// Its root on this host.
    pub path: PathBuf,
    /// The identity in its root.
    pub identity: String,
}

/// What `host show` lists of a datastore.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatastoreInfo {
    /// Name.
    pub name: String,
    /// Root on this host.
    pub path: PathBuf,
    /// Identity (UUID).
    pub identity: String,
    /// Free bytes (for unprivileged users).
    pub free_bytes: u64,
    /// Size of the filesystem, bytes.
    pub total_bytes: u64,
}

/// A datastore cannot be opened.
#[derive(Debug, thiserror::Error)]
#[error("datastore '{name}' at {path}: {problem}")]
pub struct DatastoreError {
    /// Name.
    pub name: String,
    /// Root.
    pub path: PathBuf,
    /// What is wrong.
    pub problem: String,
}

impl Datastore {
    /// Opens the datastore at `path` (creating the directory if it is missing), reading its
    /// identity or writing a new one. Two hosts opening a new shared datastore at once agree:
    /// the file is created exclusively, and the loser reads the winner's.
    pub fn open(name: &str, path: &Path) -> Result<Datastore, DatastoreError> {
        let error = |problem: String| DatastoreError {
            name: name.to_string(),
            path: path.to_path_buf(),
            problem,
        };
        std::fs::create_dir_all(path).map_err(|e| error(format!("cannot create it: {e}")))?;
        let file = path.join(IDENTITY_FILE);
        let fresh = uuid::Uuid::new_v4().to_string();
        match OpenOptions::new().write(true).create_new(true).open(&file) {
            Ok(mut f) => {
                f.write_all(format!("{fresh}\n").as_bytes())
                    .and_then(|()| f.sync_all())
                    .map_err(|e| error(format!("cannot write its identity file: {e}")))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(error(format!("cannot create its identity file: {e}"))),
        }
        // Read back what is there (ours, or the winner's of a race); a file still being
        // written by another host is empty for a moment.
        for _ in 0..50 {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| error(format!("cannot read its identity file: {e}")))?;
            let identity = text.trim();
            if identity.is_empty() {
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
            if uuid::Uuid::parse_str(identity).is_err() {
                return Err(error(format!(
                    "its identity file {} holds '{identity}', not a UUID",
                    file.display()
                )));
            }
            return Ok(Datastore {
                name: name.to_string(),
                path: path.to_path_buf(),
                identity: identity.to_string(),
            });
        }
        Err(error(format!(
            "its identity file {} stays empty",
            file.display()
        )))
    }

    /// Path and space now.
    pub fn info(&self) -> DatastoreInfo {
        let (free_bytes, total_bytes) = space(&self.path).unwrap_or((0, 0));
        DatastoreInfo {
            name: self.name.clone(),
            path: self.path.clone(),
            identity: self.identity.clone(),
            free_bytes,
            total_bytes,
        }
    }

    /// Where `file` of this datastore is on this host.
    pub fn image_path(&self, file: &str) -> PathBuf {
        self.path.join(file)
    }
}

/// Opens every configured datastore.
pub fn open_all(
    configured: &BTreeMap<String, PathBuf>,
) -> Result<BTreeMap<String, Datastore>, DatastoreError> {
    configured
        .iter()
        .map(|(name, path)| Ok((name.clone(), Datastore::open(name, path)?)))
        .collect()
}

/// Free and total bytes of the filesystem holding `path`.
pub fn space(path: &Path) -> std::io::Result<(u64, u64)> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("path holds a NUL byte"))?;
    // SAFETY: a zeroed statvfs is a valid out-parameter.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let block = stat.f_frsize;
    Ok((stat.f_bavail * block, stat.f_blocks * block))
}

/// A VM's disk, by name: the datastore and the image file in it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRef {
    /// Datastore name.
    pub datastore: String,
    /// Image file, relative to the datastore's root.
    pub file: String,
    /// Writes refused.
    pub read_only: bool,
}

/// A VM's disk as `vm show` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDisk {
    /// Datastore name.
    pub datastore: String,
    /// Image file in it.
    pub file: String,
    /// The image on this host.
    pub path: Option<PathBuf>,
    /// Size, bytes.
    pub size: u64,
    /// Bytes allocated in the datastore (a sparse image holds less than its size).
    #[serde(default)]
    pub allocated: u64,
    /// Writes refused.
    pub read_only: bool,
    /// This VM holds the image's lock.
    pub locked: bool,
    /// Requests served.
    pub counters: ferry_runtime::devices::virtio::block::BlockCounters,
}

impl VmDisk {
    /// The disk by name.
    pub fn reference(&self) -> DiskRef {
        DiskRef {
            datastore: self.datastore.clone(),
            file: self.file.clone(),
            read_only: self.read_only,
        }
    }

    /// `disk` as the VMM reports it (`live`, when it does).
    pub fn describe(disk: &DiskRef, live: Option<&ferry_runtime::DiskInfo>) -> VmDisk {
        VmDisk {
            datastore: disk.datastore.clone(),
            file: disk.file.clone(),
            path: live.map(|l| l.path.clone()),
            size: live.map_or(0, |l| l.size),
            allocated: live.map_or(0, |l| l.allocated),
            read_only: disk.read_only,
            locked: live.is_some_and(|l| l.locked),
            counters: live.map(|l| l.counters).unwrap_or_default(),
        }
    }
}

/// A disk as `vm create --disk` asks for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRequest {
    /// Datastore name.
    pub datastore: String,
    /// Image file in it.
    pub file: String,
    /// Size to create it with, if it does not exist.
    pub size: Option<u64>,
    /// Attach read-only.
    #[serde(default)]
    pub read_only: bool,
}

impl DiskRequest {
    /// Parses `DATASTORE:FILE[,size=SIZE][,ro]`.
    pub fn parse(spec: &str) -> Result<DiskRequest, String> {
        let mut parts = spec.split(',');
        let head = parts.next().unwrap_or("");
        let (datastore, file) = head.split_once(':').ok_or_else(|| {
            format!(
                "disk '{spec}' must be DATASTORE:FILE[,size=SIZE][,ro], e.g. shared:web.raw,size=4G"
            )
        })?;
        let mut request = DiskRequest {
            datastore: datastore.to_string(),
            file: file.to_string(),
            size: None,
            read_only: false,
        };
        for option in parts {
            match option.split_once('=') {
                Some(("size", size)) => {
                    request.size = Some(
                        ferry_runtime::units::parse_size(size)
                            .map_err(|e| format!("disk '{spec}': {e}"))?,
                    );
                }
                None if option == "ro" => request.read_only = true,
                _ => {
                    return Err(format!(
                        "disk '{spec}': unknown option '{option}' (known: size=SIZE, ro)"
                    ));
                }
            }
        }
        request.check()?;
        Ok(request)
    }

    /// The names must be usable: a datastore name, and a file name inside the datastore's
    /// root (no directories, nothing hidden).
    pub fn check(&self) -> Result<(), String> {
        if self.datastore.is_empty() {
            return Err("a disk needs a datastore name".into());
        }
        check_file_name(&self.file)?;
        if let Some(size) = self.size
            && (size == 0
                || !size.is_multiple_of(ferry_runtime::devices::virtio::block::SECTOR_SIZE))
        {
            return Err(format!(
                "disk size {size} must be a non-zero multiple of 512 bytes"
            ));
        }
        Ok(())
    }
}

/// An image file name: letters, digits, `-`, `_`, `.`, not starting with `.`, at most 128.
pub fn check_file_name(file: &str) -> Result<(), String> {
    let ok = !file.is_empty()
        && file.len() <= 128
        && !file.starts_with('.')
        && file
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "disk file '{file}' is not a valid image name (letters, digits, '-', '_', '.'; no directories, not starting with '.')"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_arguments_parse_and_bad_ones_say_why() {
        let d = DiskRequest::parse("shared:web.raw,size=4G").unwrap();
        assert_eq!(
            (d.datastore.as_str(), d.file.as_str(), d.size, d.read_only),
            ("shared", "web.raw", Some(4 << 30), false)
        );
        assert!(DiskRequest::parse("local:a.raw,ro").unwrap().read_only);
        for (bad, says) in [
            ("web.raw", "DATASTORE:FILE"),
            ("shared:../etc/passwd", "not a valid image name"),
            ("shared:a/b.raw", "not a valid image name"),
            ("shared:.ferry-datastore", "not a valid image name"),
            ("shared:a.raw,size=100", "multiple of 512"),
            ("shared:a.raw,size=lots", "disk 'shared:a.raw,size=lots'"),
            ("shared:a.raw,cache=none", "unknown option 'cache=none'"),
            (":a.raw", "datastore name"),
        ] {
            let error = DiskRequest::parse(bad).unwrap_err();
            assert!(error.contains(says), "{bad}: {error}");
        }
    }

    #[test]
    fn a_datastore_keeps_its_identity_and_a_second_opener_shares_it() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("shared");
        let first = Datastore::open("shared", &root).unwrap();
        let again = Datastore::open("shared", &root).unwrap();
        assert_eq!(first.identity, again.identity);
        let other = Datastore::open("shared", &dir.path().join("elsewhere")).unwrap();
        assert_ne!(
            first.identity, other.identity,
            "another directory, another identity"
        );
        let info = first.info();
        assert!(info.total_bytes > 0 && info.free_bytes <= info.total_bytes);
        std::fs::write(root.join(IDENTITY_FILE), "not-a-uuid").unwrap();
        let error = Datastore::open("shared", &root).unwrap_err().to_string();
        assert!(error.contains("not a UUID"), "{error}");
    }
}
