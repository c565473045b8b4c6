//! A raw disk image and its lock: one image open for writing by exactly one VM on any host.
//!
//! Locks are open-file-description locks (`F_OFD_SETLK`), as QEMU's image locking uses: tied
//! to the open file rather than the process, so two VMs in one process conflict too, and
//! visible across hosts on a shared filesystem that implements POSIX locks. A writer holds a
//! write lock on the whole file; a read-only user holds a read lock, so a writer excludes
//! readers and the reverse. During a migration the source releases its lock once the guest is
//! paused and its writes are flushed, and the destination takes it before it runs the VM.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;

/// An image operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The file cannot be opened.
    #[error("cannot open disk image {path}")]
    Open {
        /// The image.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Another VM holds it.
    #[error("disk image {path} is in use by another VM (it holds the image's {held} lock)")]
    Locked {
        /// The image.
        path: PathBuf,
        /// "write" or "read".
        held: &'static str,
    },
    /// Locking failed for another reason (a filesystem without POSIX locks, say).
    #[error("cannot lock disk image {path}")]
    Lock {
        /// The image.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The image is not a whole number of sectors.
    #[error("disk image {path} is {size} bytes, not a whole number of {SECTOR_SIZE}-byte sectors")]
    Size {
        /// The image.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
}

/// An open raw image.
#[derive(Debug)]
pub struct DiskImage {
    file: File,
    path: PathBuf,
    size: u64,
    read_only: bool,
    locked: bool,
}

fn ofd_lock(file: &File, kind: libc::c_short) -> io::Result<()> {
    // SAFETY: a zeroed flock is valid; the fields that matter are set below.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = 0;
    lock.l_len = 0; // the whole file, however it grows
    // SAFETY: fcntl on an open descriptor with a valid flock; F_OFD_SETLK does not block.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl DiskImage {
    /// Opens `path` and takes its lock (write, or read for a read-only image).
    pub fn open(path: &Path, read_only: bool) -> Result<DiskImage, ImageError> {
        let mut image = Self::open_unlocked(path, read_only)?;
        image.lock()?;
        Ok(image)
    }

    /// Opens `path` without taking its lock: a migration's destination, which takes it only
    /// once the source has let it go.
    pub fn open_unlocked(path: &Path, read_only: bool) -> Result<DiskImage, ImageError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| ImageError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let size = file
            .metadata()
            .map_err(|source| ImageError::Open {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        if !size.is_multiple_of(SECTOR_SIZE) {
            return Err(ImageError::Size {
                path: path.to_path_buf(),
                size,
            });
        }
        Ok(DiskImage {
            file,
            path: path.to_path_buf(),
            size,
            read_only,
            locked: false,
        })
    }

    /// Creates a sparse image of `size` bytes at `path` if nothing is there; an existing
    /// file is left as it is.
    pub fn create_sparse(path: &Path, size: u64) -> Result<(), ImageError> {
        let open_error = |source| ImageError::Open {
            path: path.to_path_buf(),
            source,
        };
        if !size.is_multiple_of(SECTOR_SIZE) {
            return Err(ImageError::Size {
                path: path.to_path_buf(),
                size,
            });
        }
        match OpenOptions::new().write(true).create_new(true).open(path) {
            Ok(file) => file.set_len(size).map_err(open_error),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(open_error(e)),
        }
    }

    /// Creates a sparse image of `size` bytes at `path`; refuses if anything is there (a
    /// migration's new image never replaces one).
    pub fn create_new_sparse(path: &Path, size: u64) -> Result<(), ImageError> {
        let open_error = |source| ImageError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(open_error)?;
        file.set_len(size).map_err(open_error)
    }

    /// Takes the lock again (a migration that failed after the handover started).
    pub fn lock(&mut self) -> Result<(), ImageError> {
        let kind = if self.read_only {
            libc::F_RDLCK
        } else {
            libc::F_WRLCK
        };
        match ofd_lock(&self.file, kind as libc::c_short) {
            Ok(()) => {
                self.locked = true;
                Ok(())
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) => {
                Err(ImageError::Locked {
                    path: self.path.clone(),
                    held: if self.read_only {
                        "write"
                    } else {
                        "read or write"
                    },
                })
            }
            Err(source) => Err(ImageError::Lock {
                path: self.path.clone(),
                source,
            }),
        }
    }

    /// Gives the lock up (the guest is paused and flushed, and another host takes over).
    pub fn unlock(&mut self) -> Result<(), ImageError> {
        ofd_lock(&self.file, libc::F_UNLCK as libc::c_short).map_err(|source| {
            ImageError::Lock {
                path: self.path.clone(),
                source,
            }
        })?;
        self.locked = false;
        Ok(())
    }

    /// Whether this image holds its lock.
    pub fn is_locked(&self) -> bool {
        self.locked
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size, bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Reads `buf.len()` bytes at `offset` (reads past the end are the caller's bug, checked
    /// before).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// Writes `buf` at `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    /// Bytes the filesystem has allocated for the image (a sparse image holds less than its
    /// size).
    pub fn allocated(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().map_or(0, |m| m.blocks() * 512)
    }

    /// The extents that hold data, in order (`SEEK_DATA`/`SEEK_HOLE`): what a copy of the
    /// image must read; everything else reads as zeros. A filesystem without hole reporting
    /// answers with one extent, the whole file.
    pub fn data_extents(&self) -> io::Result<Vec<(u64, u64)>> {
        let fd = self.file.as_raw_fd();
        let mut extents = Vec::new();
        let mut at: i64 = 0;
        let size = self.size as i64;
        while at < size {
            // SAFETY: lseek on an open descriptor; it only moves the file offset, which no
            // other code of this image uses (reads and writes are positional).
            let start = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
            if start < 0 {
                let error = io::Error::last_os_error();
                if error.raw_os_error() == Some(libc::ENXIO) {
                    break; // no data past `at`
                }
                return Err(error);
            }
            // SAFETY: as above.
            let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
            if end < 0 {
                return Err(io::Error::last_os_error());
            }
            let end = end.min(size);
            if end > start {
                extents.push((start as u64, (end - start) as u64));
            }
            at = end.max(start + 1);
        }
        Ok(extents)
    }

    /// Makes every completed write durable (`fdatasync`).
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_writer_per_image_and_readers_exclude_writers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        DiskImage::create_sparse(&path, 1 << 20).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20);
        // Creating again leaves what is there.
        std::fs::write(&path, vec![7u8; 4096]).unwrap();
        DiskImage::create_sparse(&path, 1 << 20).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4096);

        let mut first = DiskImage::open(&path, false).unwrap();
        let second = DiskImage::open(&path, false).unwrap_err();
        assert!(matches!(second, ImageError::Locked { .. }), "{second}");
        assert!(second.to_string().contains("in use by another VM"));
        let reader = DiskImage::open(&path, true).unwrap_err();
        assert!(matches!(reader, ImageError::Locked { .. }), "{reader}");
        // The handover: released by one, taken by the other, and not back while held.
        first.unlock().unwrap();
        assert!(!first.is_locked());
        let mut second = DiskImage::open(&path, false).unwrap();
        assert!(matches!(first.lock(), Err(ImageError::Locked { .. })));
        second.unlock().unwrap();
        first.lock().unwrap();
        drop(first);
        // Readers share.
        let _a = DiskImage::open(&path, true).unwrap();
        let _b = DiskImage::open(&path, true).unwrap();
        assert!(matches!(
            DiskImage::open(&path, false),
            Err(ImageError::Locked { .. })
        ));
    }

    #[test]
    fn data_extents_skip_the_holes_of_a_sparse_image() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse.raw");
        DiskImage::create_sparse(&path, 64 << 20).unwrap();
        let image = DiskImage::open(&path, false).unwrap();
        assert_eq!(
            image.data_extents().unwrap(),
            vec![],
            "a new image is all hole"
        );
        assert_eq!(image.allocated(), 0);
        image.write_at(&[1u8; 4096], 8 << 20).unwrap();
        image.write_at(&[2u8; 8192], 40 << 20).unwrap();
        image.write_at(&[3u8; 512], (64 << 20) - 512).unwrap();
        let extents = image.data_extents().unwrap();
        // Filesystems allocate in their own blocks; every written byte is covered, and most
        // of the image is not.
        for (offset, len) in [
            (8u64 << 20, 4096u64),
            (40 << 20, 8192),
            ((64 << 20) - 512, 512),
        ] {
            assert!(
                extents
                    .iter()
                    .any(|&(s, l)| s <= offset && offset + len <= s + l),
                "{offset:#x}+{len} not in {extents:x?}"
            );
        }
        let covered: u64 = extents.iter().map(|&(_, l)| l).sum();
        assert!(covered < 4 << 20, "{covered} bytes for 12.5 KiB written");
        assert!(image.allocated() >= 12 << 10);
        assert!(extents.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0));
    }

    #[test]
    fn images_are_whole_sectors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("odd.raw");
        std::fs::write(&path, [0u8; 1000]).unwrap();
        assert!(matches!(
            DiskImage::open(&path, false),
            Err(ImageError::Size { size: 1000, .. })
        ));
        assert!(matches!(
            DiskImage::create_sparse(&dir.path().join("x.raw"), 100),
            Err(ImageError::Size { .. })
        ));
    }
}
