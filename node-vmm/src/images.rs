//! Boot files of a guest, resolved only inside the node's image directory.
//!
//! `spec.boot.kernel` and `spec.boot.initrd` are paths relative to the node's image
//! directory. A path that is absolute, contains `..`, or reaches outside the directory
//! through a symlink is refused with [`ImageError::BootPath`] naming the field; so is a
//! file that does not exist. Empty fields take the node's defaults for the guest's
//! architecture: `<arch>/vmlinux` and `<arch>/initramfs.cpio.gz` (for example
//! `ppc64le/vmlinux`), what `node-vmm/guest/build.sh --arch <arch>` writes.

use corescale_api::{Arch, Boot};
use std::path::{Component, Path, PathBuf};
use thiserror::Error;

/// A boot file or disk image this node cannot use, naming the spec field.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ImageError {
    /// `spec.boot.kernel`, `spec.boot.initrd` or `spec.boot.cmdline` cannot be used.
    #[error("{field}: {message}")]
    BootPath {
        /// The spec field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// `spec.disks[index].image` cannot be used.
    #[error("spec.disks[{index}].image: {message}")]
    DiskImage {
        /// The disk's index in spec.disks.
        index: usize,
        /// What is wrong.
        message: String,
    },
}

/// Default kernel file name inside an architecture's subdirectory.
pub const DEFAULT_KERNEL: &str = "vmlinux";
/// Default initrd file name inside an architecture's subdirectory.
pub const DEFAULT_INITRD: &str = "initramfs.cpio.gz";
/// Field names, as the errors name them.
pub const KERNEL_FIELD: &str = "spec.boot.kernel";
/// Field name of the initrd.
pub const INITRD_FIELD: &str = "spec.boot.initrd";
/// Field name of the command line.
pub const CMDLINE_FIELD: &str = "spec.boot.cmdline";
/// Longest extra kernel command line accepted (the CRD allows the same).
pub const MAX_CMDLINE: usize = 1024;

/// Boot files of one guest, absolute and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootFiles {
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initial ramdisk, if any.
    pub initrd: Option<PathBuf>,
    /// Extra kernel command line.
    pub cmdline: String,
}

/// The node's image directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageDir {
    root: PathBuf,
}

impl ImageDir {
    /// An image directory rooted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        ImageDir { root: root.into() }
    }

    /// `${CORESCALE_CACHE:-$HOME/.cache/corescale}/guest`, where `node-vmm/guest/build.sh`
    /// puts the test guests (one subdirectory per architecture).
    pub fn default_root() -> PathBuf {
        let cache = std::env::var_os("CORESCALE_CACHE")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                let home = std::env::var_os("HOME")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from("/root"));
                home.join(".cache").join("corescale")
            });
        cache.join("guest")
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Resolve `spec.boot` for a guest of `arch` (absent or empty fields take that
    /// architecture's defaults).
    pub fn resolve(&self, boot: Option<&Boot>, arch: Arch) -> Result<BootFiles, ImageError> {
        let default_kernel = format!("{arch}/{DEFAULT_KERNEL}");
        let default_initrd = format!("{arch}/{DEFAULT_INITRD}");
        fn field(v: Option<&Option<String>>) -> Option<&str> {
            v.and_then(|o| o.as_deref())
                .filter(|s| !s.trim().is_empty())
        }
        let kernel = self.resolve_file(
            KERNEL_FIELD,
            field(boot.map(|b| &b.kernel)).unwrap_or(&default_kernel),
        )?;
        let initrd = match field(boot.map(|b| &b.initrd)) {
            Some(rel) => Some(self.resolve_file(INITRD_FIELD, rel)?),
            None => self.resolve_file(INITRD_FIELD, &default_initrd).ok(),
        };
        let cmdline = boot.and_then(|b| b.cmdline.clone()).unwrap_or_default();
        if cmdline.len() > MAX_CMDLINE {
            return Err(ImageError::BootPath {
                field: CMDLINE_FIELD,
                message: format!(
                    "is {} bytes long; at most {MAX_CMDLINE} are allowed",
                    cmdline.len()
                ),
            });
        }
        if cmdline.chars().any(|c| c.is_control()) {
            return Err(ImageError::BootPath {
                field: CMDLINE_FIELD,
                message:
                    "contains control characters (newlines, NUL...); use spaces between options"
                        .into(),
            });
        }
        Ok(BootFiles {
            kernel,
            initrd,
            cmdline,
        })
    }

    /// Resolve one relative path inside the directory.
    pub fn resolve_file(&self, field: &'static str, rel: &str) -> Result<PathBuf, ImageError> {
        self.resolve_in(rel)
            .map_err(|message| ImageError::BootPath { field, message })
    }

    /// Resolve a disk image, spec.disks[`index`].image.
    pub fn resolve_disk_image(&self, index: usize, rel: &str) -> Result<PathBuf, ImageError> {
        self.resolve_in(rel)
            .map_err(|message| ImageError::DiskImage { index, message })
    }

    fn resolve_in(&self, rel: &str) -> Result<PathBuf, String> {
        let err = |message: String| message;
        let p = Path::new(rel);
        if p.is_absolute() {
            return Err(err(format!(
                "{rel:?} is an absolute path; give a path relative to the node's image directory {}",
                self.root.display()
            )));
        }
        if p.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(err(format!(
                "{rel:?} contains '..'; give a path inside the node's image directory {}",
                self.root.display()
            )));
        }
        let root = self.root.canonicalize().map_err(|e| {
            err(format!(
                "the node's image directory {} is not usable ({e}); build the default guest with node-vmm/guest/build.sh or set the node's image directory",
                self.root.display()
            ))
        })?;
        let joined = root.join(p);
        let real = joined.canonicalize().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                err(format!(
                    "{rel:?} not found in the node's image directory {} (build the default guest with node-vmm/guest/build.sh, or copy the file there)",
                    root.display()
                ))
            } else {
                err(format!("{rel:?} in {}: {e}", root.display()))
            }
        })?;
        if !real.starts_with(&root) {
            return Err(err(format!(
                "{rel:?} is a symlink that leads outside the node's image directory {} (to {})",
                root.display(),
                real.display()
            )));
        }
        if !real.is_file() {
            return Err(err(format!(
                "{rel:?} in {} is not a regular file",
                root.display()
            )));
        }
        Ok(real)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boot(kernel: Option<&str>, initrd: Option<&str>) -> Boot {
        Boot {
            kernel: kernel.map(Into::into),
            initrd: initrd.map(Into::into),
            cmdline: Some("quiet".into()),
        }
    }

    #[test]
    fn resolves_defaults_and_refuses_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("images");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::create_dir_all(root.join("x86_64")).unwrap();
        std::fs::create_dir_all(root.join("ppc64le")).unwrap();
        std::fs::write(root.join("x86_64").join(DEFAULT_KERNEL), b"k").unwrap();
        std::fs::write(root.join("ppc64le").join(DEFAULT_KERNEL), b"p").unwrap();
        std::fs::write(root.join("sub/k2"), b"k").unwrap();
        std::fs::write(dir.path().join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("escape")).unwrap();
        std::os::unix::fs::symlink("sub/k2", root.join("inside")).unwrap();
        let img = ImageDir::new(&root);
        let real_root = root.canonicalize().unwrap();

        // Defaults: kernel present, no initrd in the directory; per architecture.
        let b = img.resolve(None, Arch::X86_64).unwrap();
        assert_eq!(b.kernel, real_root.join("x86_64").join(DEFAULT_KERNEL));
        assert_eq!(b.initrd, None);
        let b = img.resolve(None, Arch::Ppc64le).unwrap();
        assert_eq!(b.kernel, real_root.join("ppc64le").join(DEFAULT_KERNEL));
        std::fs::write(root.join("x86_64").join(DEFAULT_INITRD), b"i").unwrap();
        let b = img
            .resolve(Some(&boot(Some(""), None)), Arch::X86_64)
            .unwrap();
        assert_eq!(
            b.initrd,
            Some(real_root.join("x86_64").join(DEFAULT_INITRD))
        );
        assert_eq!(b.cmdline, "quiet");

        assert_eq!(
            img.resolve(Some(&boot(Some("sub/k2"), None)), Arch::X86_64)
                .unwrap()
                .kernel,
            real_root.join("sub/k2")
        );
        assert_eq!(
            img.resolve(Some(&boot(Some("inside"), None)), Arch::X86_64)
                .unwrap()
                .kernel,
            real_root.join("sub/k2")
        );

        // Disk images resolve the same way: a symlink leaves the directory, a versioned
        // image behind a symlink resolves to the versioned file.
        let e = img.resolve_disk_image(2, "escape").unwrap_err();
        assert!(
            e.to_string().starts_with("spec.disks[2].image:")
                && e.to_string().contains("leads outside"),
            "{e}"
        );
        assert_eq!(
            img.resolve_disk_image(0, "inside").unwrap(),
            real_root.join("sub/k2")
        );

        for (k, i, field, needle) in [
            (Some("/etc/passwd"), None, KERNEL_FIELD, "absolute path"),
            (Some("../secret"), None, KERNEL_FIELD, "contains '..'"),
            (
                Some("sub/../../secret"),
                None,
                KERNEL_FIELD,
                "contains '..'",
            ),
            (Some("escape"), None, KERNEL_FIELD, "leads outside"),
            (Some("missing"), None, KERNEL_FIELD, "not found"),
            (None, Some("escape"), INITRD_FIELD, "leads outside"),
            (None, Some("nope.cpio"), INITRD_FIELD, "not found"),
            (Some("sub"), None, KERNEL_FIELD, "not a regular file"),
        ] {
            let e = img.resolve(Some(&boot(k, i)), Arch::X86_64).unwrap_err();
            match &e {
                ImageError::BootPath { field: f, message } => {
                    assert_eq!(*f, field, "{e}");
                    assert!(message.contains(needle), "{e}");
                }
                other => panic!("expected BootPath, got {other:?}"),
            }
            assert!(e.to_string().starts_with(field), "{e}");
        }
        let mut long = boot(None, None);
        long.cmdline = Some("x".repeat(MAX_CMDLINE + 1));
        assert!(matches!(
            img.resolve(Some(&long), Arch::X86_64),
            Err(ImageError::BootPath {
                field: CMDLINE_FIELD,
                ..
            })
        ));
        let missing_root = ImageDir::new(dir.path().join("nowhere"));
        let e = missing_root.resolve(None, Arch::X86_64).unwrap_err();
        assert!(e.to_string().contains("build.sh"), "{e}");
    }
}
