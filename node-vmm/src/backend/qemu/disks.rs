//! A guest's disks on the node, in `<state>/.disks/<namespace>/<name>/` (a namespace cannot
//! be named `.disks`): one qcow2 file per disk — a copy-on-write overlay of an image (the
//! image is only ever opened read-only, as the overlay's backing file) or an empty disk —
//! and a `uid` file naming the VirtualMachine they belong to. They outlive the guest's
//! process (the per-VM runtime directory is removed when the guest stops) so a disk keeps
//! its data across agent restarts, guest reboots and VM restarts on this node; they are
//! removed when the VM is deleted or leaves the node, and replaced when a VM of the same
//! name but another UID starts. Created with `qemu-img`.

use crate::backend::workload::{DiskSource, DiskSpec};
use crate::backend::{BackendError, Cause, VmKey};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Directory of every guest's disks under the state directory.
pub const DISKS_DIR: &str = ".disks";
const UID_FILE: &str = "uid";

/// The directory of one guest's disks.
pub fn disk_dir(state: &Path, key: &VmKey) -> PathBuf {
    state.join(DISKS_DIR).join(&key.namespace).join(&key.name)
}

/// The file of disk `name`.
pub fn disk_path(state: &Path, key: &VmKey, name: &str) -> PathBuf {
    disk_dir(state, key).join(format!("{name}.qcow2"))
}

/// One disk ready to attach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedDisk {
    /// spec.disks[].name.
    pub name: String,
    /// The qcow2 file.
    pub path: PathBuf,
    /// Whether this start created it (its data is fresh).
    pub created: bool,
}

async fn qemu_img(args: &[&str]) -> Result<String, BackendError> {
    let bin = super::find_binary("qemu-img").map_err(|_| BackendError::MissingBinary {
        binary: "qemu-img".into(),
        hint: "install qemu-utils (scripts/install-deps.sh)".into(),
    })?;
    let out = tokio::process::Command::new(&bin)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| BackendError::io(format!("running {}", bin.display()), e))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(BackendError::Io {
            context: format!("qemu-img {}", args.join(" ")),
            source: Cause::msg(String::from_utf8_lossy(&out.stderr).trim()),
        })
    }
}

/// The format of an image file (qcow2 or raw), as qemu-img reads it.
async fn image_format(image: &Path, index: usize) -> Result<String, BackendError> {
    let info = qemu_img(&["info", "--output=json", &image.display().to_string()])
        .await
        .map_err(|e| BackendError::Field {
            field: format!("spec.disks[{index}].image"),
            message: format!("{} is not a disk image QEMU can read: {e}", image.display()),
        })?;
    let v: serde_json::Value = serde_json::from_str(&info)
        .map_err(|e| BackendError::Protocol(Cause::msg(format!("qemu-img info: {e}"))))?;
    match v["format"].as_str() {
        Some(f @ ("qcow2" | "raw")) => Ok(f.to_string()),
        other => Err(BackendError::Field {
            field: format!("spec.disks[{index}].image"),
            message: format!(
                "{} is {other:?}; qcow2 and raw images are supported",
                image.display()
            ),
        }),
    }
}

/// What identifies an image file cheaply: its path, inode, size and modification time. A
/// rebuild published by renaming (a new inode) or rewritten in place (a new mtime) changes it.
fn identity(image: &Path) -> std::io::Result<serde_json::Value> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(image)?;
    Ok(serde_json::json!({
        "path": image.display().to_string(),
        "inode": m.ino(),
        "bytes": m.len(),
        "mtime_ns": i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
    }))
}

/// An overlay is valid only on the very file it was made on: that file must still be there,
/// unchanged. (A VM keeps the image it was created from; a newer image under the name
/// spec.disks[].image gives new VMs the new one, see `node-vmm/guest/build-disk.sh`.)
fn check_base(index: usize, recorded: &str) -> Result<(), BackendError> {
    let was: serde_json::Value = serde_json::from_str(recorded)
        .map_err(|e| BackendError::Protocol(Cause::msg(format!("disk base record: {e}"))))?;
    let path = PathBuf::from(was["path"].as_str().unwrap_or_default());
    let now = identity(&path).ok();
    if now.as_ref() == Some(&was) {
        return Ok(());
    }
    Err(BackendError::Field {
        field: format!("spec.disks[{index}].image"),
        message: format!(
            "the image this VM's disk was made from, {}, was {} since; the disk (a copy-on-write overlay, holding only the blocks the guest changed) is valid only on that file. Put it back, or delete and re-create the VM to start over; publish new images under new names",
            path.display(),
            if now.is_some() { "rebuilt or replaced" } else { "removed" }
        ),
    })
}

/// Make sure every disk of a guest exists: reuse the files of the same VM (same `uid`),
/// create the missing ones. A directory left by another VM of the same name is emptied.
pub async fn prepare(
    state: &Path,
    key: &VmKey,
    uid: &str,
    disks: &[DiskSpec],
) -> Result<Vec<PreparedDisk>, BackendError> {
    if disks.is_empty() {
        return Ok(Vec::new());
    }
    let dir = disk_dir(state, key);
    let io = |what: &str, p: &Path, e: std::io::Error| {
        BackendError::io(format!("{what} {}", p.display()), e)
    };
    let recorded = std::fs::read_to_string(dir.join(UID_FILE)).ok();
    if recorded.as_deref().is_some_and(|r| r.trim() != uid) {
        tracing::info!(vm = %key, "disks of an earlier VM of this name: removing them");
        std::fs::remove_dir_all(&dir).map_err(|e| io("removing", &dir, e))?;
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| io("creating", &dir, e))?;
    crate::launcher::write_private(&dir.join(UID_FILE), uid.as_bytes())
        .map_err(|e| io("writing", &dir.join(UID_FILE), e))?;
    let mut out = Vec::with_capacity(disks.len());
    for (i, d) in disks.iter().enumerate() {
        let path = disk_path(state, key, &d.name);
        let base_file = dir.join(format!("{}.base.json", d.name));
        if path.is_file() {
            if let (DiskSource::Image(_), Ok(recorded)) =
                (&d.source, std::fs::read_to_string(&base_file))
            {
                check_base(i, &recorded)?;
            }
            out.push(PreparedDisk {
                name: d.name.clone(),
                path,
                created: false,
            });
            continue;
        } // Created under a temporary name and renamed: a start cut short leaves no
          // half-made disk that a later start would take for the real one.
        let tmp = dir.join(format!(".{}.tmp", d.name));
        let tmp_s = tmp.display().to_string();
        match &d.source {
            DiskSource::Image(image) => {
                let id = identity(image).map_err(|e| io("reading", image, e))?;
                crate::launcher::write_private(&base_file, id.to_string().as_bytes())
                    .map_err(|e| io("writing", &base_file, e))?;
                let fmt = image_format(image, i).await?;
                let base = image.display().to_string();
                qemu_img(&[
                    "create", "-q", "-f", "qcow2", "-F", &fmt, "-b", &base, &tmp_s,
                ])
                .await?;
            }
            DiskSource::Empty(bytes) => {
                qemu_img(&["create", "-q", "-f", "qcow2", &tmp_s, &bytes.to_string()]).await?;
            }
        }
        // qemu-img follows the umask; a disk holds the guest's data: the owner's only.
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| io("restricting", &tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| io("renaming", &tmp, e))?;
        out.push(PreparedDisk {
            name: d.name.clone(),
            path,
            created: true,
        });
    }
    Ok(out)
}

/// Remove a guest's disks (the VM was deleted or left this node).
pub fn remove(state: &Path, key: &VmKey) -> Result<(), BackendError> {
    let dir = disk_dir(state, key);
    match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(BackendError::io(format!("removing {}", dir.display()), e))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> VmKey {
        VmKey {
            namespace: "ns".into(),
            name: "vm".into(),
        }
    }

    #[tokio::test]
    async fn overlays_keep_the_image_untouched_and_survive_until_removed() {
        let t = tempfile::tempdir().unwrap();
        let image = t.path().join("base.raw");
        std::fs::write(&image, vec![7u8; 1 << 20]).unwrap();
        let state = t.path().join("state");
        let disks = vec![
            DiskSpec {
                name: "root".into(),
                source: DiskSource::Image(image.clone()),
            },
            DiskSpec {
                name: "data".into(),
                source: DiskSource::Empty(64 << 20),
            },
        ];
        let first = prepare(&state, &key(), "u1", &disks).await.unwrap();
        assert!(first.iter().all(|d| d.created), "{first:?}");
        for d in &first {
            let mode = std::fs::metadata(&d.path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", d.path.display());
        }
        let info = qemu_img(&[
            "info",
            "--output=json",
            &first[0].path.display().to_string(),
        ])
        .await
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert_eq!(v["format"], "qcow2");
        assert_eq!(v["backing-filename"], image.display().to_string());
        assert_eq!(v["backing-filename-format"], "raw");
        let info = qemu_img(&[
            "info",
            "--output=json",
            &first[1].path.display().to_string(),
        ])
        .await
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert_eq!(v["virtual-size"], 64 << 20);
        // The same VM again: the same files, not created anew.
        let again = prepare(&state, &key(), "u1", &disks).await.unwrap();
        assert!(again.iter().all(|d| !d.created), "{again:?}");
        // The image replaced under the same name: the overlay is refused, naming the field.
        let replaced = t.path().join("base.new");
        std::fs::write(&replaced, vec![8u8; 1 << 20]).unwrap();
        std::fs::rename(&replaced, &image).unwrap();
        let e = prepare(&state, &key(), "u1", &disks).await.unwrap_err();
        assert!(
            e.to_string().starts_with("spec.disks[0].image:")
                && e.to_string().contains("rebuilt or replaced"),
            "{e}"
        );
        // Another VM of the same name: fresh disks.
        let other = prepare(&state, &key(), "u2", &disks).await.unwrap();
        assert!(other.iter().all(|d| d.created), "{other:?}");
        // A file that is not an image names the field.
        std::fs::write(t.path().join("bad.qcow2"), b"QFI\xfbnot really").unwrap();
        let bad = vec![DiskSpec {
            name: "x".into(),
            source: DiskSource::Image(t.path().join("bad.qcow2")),
        }];
        let e = prepare(
            &state,
            &VmKey {
                namespace: "ns".into(),
                name: "b".into(),
            },
            "u",
            &bad,
        )
        .await
        .unwrap_err();
        assert!(e.to_string().starts_with("spec.disks[0].image:"), "{e}");
        remove(&state, &key()).unwrap();
        assert!(!disk_dir(&state, &key()).exists());
        remove(&state, &key()).unwrap();
        assert_eq!(
            std::fs::read(&image).unwrap(),
            vec![8u8; 1 << 20],
            "the image is never written"
        );
    }
}
