//! What the QEMU guest harness (fixtures/qemu) boots beyond its cached initramfs: the
//! guest-side migration tool `mlx5-kmig` built as a static binary, and files handed to
//! the guest as a cpio archive that run-guest.sh puts before the cached initramfs
//! (`MLX5_EMU_INITRD_EXTRA`; the kernel unpacks every archive of a concatenated
//! initramfs in turn), so nothing of the cache is rebuilt for them.

use std::path::PathBuf;
use std::process::Command;

use crate::bins::workspace_root;

/// Where the guest finds the tool (init.sh's step `kmig` runs it from here).
pub const KMIG_GUEST_PATH: &str = "opt/mlx5emu/mlx5-kmig";

/// The `mlx5-kmig` binary, statically linked (`-C target-feature=+crt-static` on the
/// gnu target) so that it runs in the busybox initramfs, which has no libc. Built at
/// most once per test process, in its own target directory (`target/kmig`), so that
/// its flags never invalidate the workspace's own build.
pub fn kmig_static_binary() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let target = "x86_64-unknown-linux-gnu";
        let dir = workspace_root().join("target/kmig");
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args([
                "build",
                "--quiet",
                "--release",
                "-p",
                "mlx5-kmig",
                "--bin",
                "mlx5-kmig",
            ])
            .args(["--target", target, "--target-dir"])
            .arg(&dir)
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .current_dir(workspace_root())
            .status()
            .expect("run cargo build for mlx5-kmig");
        assert!(
            status.success(),
            "cargo build -p mlx5-kmig (static, --target {target}) failed: is the target's \
             static glibc (libc6-dev) installed?"
        );
        let path = dir.join(target).join("release/mlx5-kmig");
        assert!(path.exists(), "{} missing after build", path.display());
        path
    })
    .clone()
}

/// One file of an initramfs overlay: its path in the guest (no leading `/`), its
/// bytes and its mode bits.
pub struct GuestFile {
    /// Path inside the guest, relative to `/`.
    pub path: String,
    /// Contents.
    pub data: Vec<u8>,
    /// Permission bits (0o755 for a program).
    pub mode: u32,
}

fn newc_entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8]) {
    let fields = [
        ino,
        mode,
        0,
        0,
        1,
        0,
        u32::try_from(data.len()).expect("a cpio member is under 4 GiB"),
        0,
        0,
        0,
        0,
        name.len() as u32 + 1,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
    out.extend_from_slice(data);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// `files` (and the directories above them) as one uncompressed newc cpio archive.
pub fn cpio_newc(files: &[GuestFile]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut dirs: Vec<String> = Vec::new();
    let mut ino = 1;
    for f in files {
        let mut at = 0;
        while let Some(i) = f.path[at..].find('/') {
            let d = f.path[..at + i].to_string();
            if !dirs.contains(&d) {
                newc_entry(&mut out, ino, &d, 0o040_755, &[]);
                ino += 1;
                dirs.push(d);
            }
            at += i + 1;
        }
        newc_entry(
            &mut out,
            ino,
            &f.path,
            0o100_000 | (f.mode & 0o7777),
            &f.data,
        );
        ino += 1;
    }
    newc_entry(&mut out, 0, "TRAILER!!!", 0, &[]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_lists_directories_then_files_and_ends_with_the_trailer() {
        let a = cpio_newc(&[
            GuestFile {
                path: "opt/x/tool".into(),
                data: b"abc".to_vec(),
                mode: 0o755,
            },
            GuestFile {
                path: "opt/x/data".into(),
                data: vec![],
                mode: 0o644,
            },
        ]);
        assert_eq!(a.len() % 4, 0);
        let text = String::from_utf8_lossy(&a);
        let names: Vec<&str> = [
            "opt\0",
            "opt/x\0",
            "opt/x/tool\0",
            "opt/x/data\0",
            "TRAILER!!!\0",
        ]
        .into_iter()
        .filter(|n| text.contains(n))
        .collect();
        assert_eq!(names.len(), 5, "{text:?}");
        assert_eq!(text.matches("070701").count(), 5);
        // The tool's header: mode 0100755, 3 bytes.
        let at = text.find("opt/x/tool").unwrap() - 110;
        assert_eq!(&text[at + 14..at + 22], "000081ed");
        assert_eq!(&text[at + 54..at + 62], "00000003");
    }
}
