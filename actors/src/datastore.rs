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

impl DiskRef {
    /// `DATASTORE:FILE`.
    pub fn name(&self) -> String {
        format!("{}:{}", self.datastore, self.file)
    }
}

/// Where each disk of a compute + storage migration goes, in slot order: the datastore
/// `per_disk` names for it (keyed by `FILE` or `DATASTORE:FILE`), else `all`. `Ok(None)`:
/// compute only (neither is given, or the VM has no disks). A storage migration moves every
/// disk, so a disk left without a target is an error, as is a key that names no disk of the
/// VM (or two), or two disks that would land on the same image.
pub fn storage_targets(
    disks: &[DiskRef],
    all: Option<&str>,
    per_disk: &BTreeMap<String, String>,
) -> Result<Option<Vec<String>>, String> {
    let names = || {
        if disks.is_empty() {
            "none".to_string()
        } else {
            disks
                .iter()
                .map(DiskRef::name)
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let mut targets: Vec<Option<String>> = vec![None; disks.len()];
    for (key, datastore) in per_disk {
        if datastore.is_empty() {
            return Err(format!("--disk-target {key}= names no datastore"));
        }
        let matching: Vec<usize> = (0..disks.len())
            .filter(|&i| disks[i].name() == *key || disks[i].file == *key)
            .collect();
        match matching.as_slice() {
            [] => {
                return Err(format!(
                    "--disk-target {key}={datastore}: the VM has no disk '{key}' (its disks: {})",
                    names()
                ));
            }
            [i] if targets[*i].is_some() => {
                return Err(format!("disk {} is given two targets", disks[*i].name()));
            }
            [i] => targets[*i] = Some(datastore.clone()),
            _ => {
                return Err(format!(
                    "--disk-target {key}={datastore}: '{key}' names several disks ({}); name one as DATASTORE:FILE",
                    matching
                        .iter()
                        .map(|&i| disks[i].name())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
    }
    if all.is_none() && per_disk.is_empty() {
        return Ok(None);
    }
    let mut resolved = Vec::with_capacity(disks.len());
    for (disk, target) in disks.iter().zip(targets) {
        let Some(target) = target.or_else(|| all.map(str::to_string)) else {
            return Err(format!(
                "disk {} has no target datastore: a storage migration moves every disk (give --datastore DS for the rest, or --disk-target {}=DS)",
                disk.name(),
                disk.file
            ));
        };
        if let Some(other) = disks
            .iter()
            .zip(&resolved)
            .find(|(d, t): &(&DiskRef, &String)| d.file == disk.file && **t == target)
        {
            return Err(format!(
                "disks {} and {} would both become {target}:{}",
                other.0.name(),
                disk.name(),
                disk.file
            ));
        }
        resolved.push(target);
    }
    Ok((!resolved.is_empty()).then_some(resolved))
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
    fn storage_targets_cover_every_disk_or_say_which_is_missing() {
        let disk = |ds: &str, file: &str| DiskRef {
            datastore: ds.into(),
            file: file.into(),
            read_only: false,
        };
        let disks = [disk("shared", "a.raw"), disk("local", "b.raw")];
        let map = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let targets =
            |all: Option<&str>, per: &[(&str, &str)]| storage_targets(&disks, all, &map(per));
        assert_eq!(targets(None, &[]), Ok(None));
        assert_eq!(storage_targets(&[], Some("x"), &map(&[])), Ok(None));
        let both = |a: &str, b: &str| Ok(Some(vec![a.to_string(), b.to_string()]));
        assert_eq!(targets(Some("dst"), &[]), both("dst", "dst"));
        assert_eq!(
            targets(Some("dst"), &[("local:b.raw", "fast")]),
            both("dst", "fast")
        );
        assert_eq!(
            targets(None, &[("a.raw", "x"), ("b.raw", "y")]),
            both("x", "y")
        );
        for (all, per, says) in [
            (
                None,
                vec![("a.raw", "x")],
                "disk local:b.raw has no target datastore",
            ),
            (
                Some("x"),
                vec![("c.raw", "y")],
                "the VM has no disk 'c.raw' (its disks: shared:a.raw, local:b.raw)",
            ),
            (
                Some("x"),
                vec![("a.raw", "y"), ("shared:a.raw", "z")],
                "given two targets",
            ),
            (Some("x"), vec![("a.raw", "")], "names no datastore"),
        ] {
            let error = targets(all, &per).unwrap_err();
            assert!(error.contains(says), "{per:?}: {error}");
        }
        let twins = [disk("one", "a.raw"), disk("two", "a.raw")];
        let error = storage_targets(&twins, Some("x"), &map(&[])).unwrap_err();
        assert!(error.contains("would both become x:a.raw"), "{error}");
        let error = storage_targets(&twins, None, &map(&[("a.raw", "x")])).unwrap_err();
        assert!(error.contains("names several disks"), "{error}");
        assert_eq!(
            storage_targets(
                &twins,
                None,
                &map(&[("one:a.raw", "x"), ("two:a.raw", "y")])
            ),
            Ok(Some(vec!["x".into(), "y".into()]))
        );
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
