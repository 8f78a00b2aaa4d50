//! The cloud-init NoCloud seed of a guest: a small FAT image labelled `CIDATA` holding
//! `meta-data`, `user-data` and (when given) `network-config`, written into the VM's
//! directory at each start and attached read-only. cloud-init finds it by its label.
//!
//! Written with the `fatfs` crate: no mkfs, mtools or loop mount on the node.

use crate::backend::workload::SeedData;
use crate::backend::BackendError;
use std::io::{Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// File name of the seed image in the VM's directory.
pub const SEED_IMAGE: &str = "cidata.img";
/// The label cloud-init looks for (FAT labels are upper case; cloud-init accepts both).
const LABEL: [u8; 11] = *b"CIDATA     ";

/// `meta-data`: JSON, which is YAML too (cloud-init reads it with a YAML loader).
pub fn meta_data(seed: &SeedData) -> String {
    let mut m = serde_json::json!({
        "instance-id": seed.instance_id,
        "local-hostname": seed.hostname,
    });
    if !seed.ssh_keys.is_empty() {
        m["public-keys"] = serde_json::json!(seed.ssh_keys);
    }
    m.to_string()
}

/// Write the seed image for `seed` to `path` (replacing one left by an earlier start).
pub fn write_seed(path: &Path, seed: &SeedData) -> Result<(), BackendError> {
    let io =
        |what: &str, e: std::io::Error| BackendError::io(format!("{what} {}", path.display()), e);
    let files: Vec<(&str, String)> = [
        Some(("meta-data", meta_data(seed))),
        // NoCloud needs user-data to exist; an empty cloud-config changes nothing.
        Some((
            "user-data",
            seed.user_data
                .clone()
                .unwrap_or_else(|| "#cloud-config\n{}\n".to_string()),
        )),
        seed.network_config.clone().map(|n| ("network-config", n)),
    ]
    .into_iter()
    .flatten()
    .collect();
    let payload: u64 = files.iter().map(|(_, c)| c.len() as u64).sum();
    // FAT12 with room for the files and their clusters: 1 MiB plus twice the payload.
    let size = (1 << 20) + 2 * payload.next_multiple_of(4096);
    let mut f = std::fs::OpenOptions::new()
        .mode(0o600)
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| io("creating", e))?;
    f.set_len(size).map_err(|e| io("sizing", e))?;
    fatfs::format_volume(
        &mut f,
        fatfs::FormatVolumeOptions::new().volume_label(LABEL),
    )
    .map_err(|e| io("formatting", e))?;
    f.rewind().map_err(|e| io("rewinding", e))?;
    {
        let fs = fatfs::FileSystem::new(&mut f, fatfs::FsOptions::new())
            .map_err(|e| io("opening", e))?;
        for (name, content) in &files {
            let mut file = fs
                .root_dir()
                .create_file(name)
                .map_err(|e| io(&format!("creating {name} in"), e))?;
            file.truncate().map_err(|e| io("truncating", e))?;
            file.write_all(content.as_bytes())
                .map_err(|e| io(&format!("writing {name} to"), e))?;
        }
        fs.unmount().map_err(|e| io("closing", e))?;
    }
    f.sync_all().map_err(|e| io("syncing", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn seed_holds_the_files_under_the_cidata_label() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SEED_IMAGE);
        let seed = SeedData {
            instance_id: "uid-1".into(),
            hostname: "web".into(),
            user_data: Some("#cloud-config\nruncmd: [[touch, /x]]\n".into()),
            network_config: None,
            ssh_keys: vec!["ssh-ed25519 AAAA k@h".into()],
        };
        write_seed(&path, &seed).unwrap();
        // Written twice: the second start replaces the first seed.
        write_seed(&path, &seed).unwrap();
        let f = std::fs::File::open(&path).unwrap();
        let fs = fatfs::FileSystem::new(f, fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.volume_label().trim(), "CIDATA");
        let mut names: Vec<String> = fs
            .root_dir()
            .iter()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["meta-data", "user-data"],
            "long names, no network-config"
        );
        let mut s = String::new();
        fs.root_dir()
            .open_file("meta-data")
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        let m: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(m["instance-id"], "uid-1");
        assert_eq!(m["public-keys"][0], "ssh-ed25519 AAAA k@h");
        // blkid (what cloud-init's ds-identify uses) sees the label too.
        let out = std::process::Command::new("blkid")
            .args(["-o", "value", "-s", "LABEL"])
            .arg(&path)
            .output()
            .expect("blkid (util-linux) is needed by this test");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "CIDATA");
    }
}
