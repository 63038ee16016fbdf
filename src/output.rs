//! `-o FILE`: nothing half-written under the final name.
//!
//! A regular file is written under a temporary name beside FILE (same
//! directory, so the rename is atomic and copy_file_range can reflink), synced
//! and renamed only once the stream is complete and verified; on failure or a
//! signal the temporary file is removed. A block or character device (a disk
//! in a rescue shell) is written in place: it cannot be renamed or truncated.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Where `get -o FILE` writes.
pub enum Output {
    /// A temporary file that becomes FILE on [`Output::commit`].
    Staged {
        file: File,
        temp: PathBuf,
        target: PathBuf,
        committed: bool,
    },
    /// A device, written in place.
    Device { file: File, target: PathBuf },
}

impl Output {
    pub fn open(target: &Path) -> Result<Output> {
        if let Ok(meta) = std::fs::metadata(target) {
            let ft = meta.file_type();
            if ft.is_block_device() || ft.is_char_device() {
                let file = OpenOptions::new()
                    .write(true)
                    .open(target)
                    .map_err(|e| Error::io(format!("opening {}", target.display()), e))?;
                return Ok(Output::Device {
                    file,
                    target: target.to_owned(),
                });
            }
            if meta.is_dir() {
                return Err(Error::Other(format!(
                    "{} is a directory; -o wants a file name",
                    target.display()
                )));
            }
        }
        let name = target
            .file_name()
            .ok_or_else(|| Error::Other(format!("{}: not a file name", target.display())))?;
        let mut temp_name = std::ffi::OsString::from(".");
        temp_name.push(name);
        temp_name.push(format!(".cloudimg-{}.tmp", std::process::id()));
        let temp = target.with_file_name(temp_name);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&temp)
            .map_err(|e| Error::io(format!("creating {}", temp.display()), e))?;
        Ok(Output::Staged {
            file,
            temp,
            target: target.to_owned(),
            committed: false,
        })
    }

    pub fn file(&self) -> &File {
        match self {
            Output::Staged { file, .. } | Output::Device { file, .. } => file,
        }
    }

    /// The stream is complete and verified: make it durable and give it its name.
    pub fn commit(mut self) -> Result<()> {
        let target_shown = match &self {
            Output::Staged { target, .. } | Output::Device { target, .. } => {
                target.display().to_string()
            }
        };
        self.file()
            .sync_data()
            .map_err(|e| Error::io(format!("syncing {target_shown}"), e))?;
        if let Output::Staged {
            temp,
            target,
            committed,
            ..
        } = &mut self
        {
            std::fs::rename(&*temp, &*target)
                .map_err(|e| Error::io(format!("renaming into {target_shown}"), e))?;
            *committed = true;
            // Make the rename itself durable.
            if let Some(dir) = target.parent() {
                let dir = if dir.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    dir
                };
                if let Ok(d) = File::open(dir) {
                    let _ = d.sync_all();
                }
            }
        }
        Ok(())
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        if let Output::Staged {
            temp,
            committed: false,
            ..
        } = self
        {
            let _ = std::fs::remove_file(&*temp);
        }
    }
}
