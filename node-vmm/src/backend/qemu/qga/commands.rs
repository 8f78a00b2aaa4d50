//! The guest-agent commands the backend uses, typed: ping, the guest's vCPUs and their
//! online state, reading a file, uptime, shutdown; and the slot a CPU's ACPI path names.

use super::{QgaClient, QgaError};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::time::{Duration, Instant};

/// One entry of `guest-get-vcpus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestLogicalProcessor {
    /// The guest's logical CPU number (cpuN).
    #[serde(rename = "logical-id")]
    pub logical_id: u32,
    /// Whether it is online.
    pub online: bool,
    /// Whether the guest allows offlining it (absent in requests).
    #[serde(
        rename = "can-offline",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub can_offline: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct FileRead {
    count: u64,
    #[serde(rename = "buf-b64")]
    buf_b64: String,
    eof: bool,
}

/// Bytes asked per `guest-file-read`.
const READ_CHUNK: u64 = 48 * 1024;

/// Parse the slot index out of a CPU's ACPI path (`\_SB_.CPUS.C00A` is slot 10): QEMU names
/// each possible CPU's processor device `C%03X` after its possible-CPU index, which is the
/// slot index on x86.
pub fn slot_from_acpi_path(path: &str) -> Option<u32> {
    let last = path.trim().rsplit('.').next()?;
    let hex = last.strip_prefix('C')?;
    if hex.is_empty() || hex.len() > 4 {
        return None;
    }
    u32::from_str_radix(hex, 16).ok()
}

impl QgaClient {
    pub async fn ping(&mut self, timeout: Duration) -> Result<(), QgaError> {
        self.execute_value("guest-ping", None, timeout)
            .await
            .map(|_| ())
    }

    /// `guest-get-vcpus`: the guest's logical CPUs (present ones, online or not).
    pub async fn get_vcpus(
        &mut self,
        timeout: Duration,
    ) -> Result<Vec<GuestLogicalProcessor>, QgaError> {
        self.execute("guest-get-vcpus", None, timeout).await
    }

    /// `guest-set-vcpus`: set the online state of logical CPUs. Returns how many the agent
    /// changed (it stops at the first failure).
    pub async fn set_vcpus(
        &mut self,
        changes: &[(u32, bool)],
        timeout: Duration,
    ) -> Result<u32, QgaError> {
        let vcpus: Vec<GuestLogicalProcessor> = changes
            .iter()
            .map(|&(logical_id, online)| GuestLogicalProcessor {
                logical_id,
                online,
                can_offline: None,
            })
            .collect();
        self.execute(
            "guest-set-vcpus",
            Some(serde_json::json!({ "vcpus": vcpus })),
            timeout,
        )
        .await
    }

    /// Read a whole guest file with `guest-file-open`/`-read`/`-close`.
    pub async fn read_file(&mut self, path: &str, timeout: Duration) -> Result<Vec<u8>, QgaError> {
        let deadline = Instant::now() + timeout;
        let left = |d: Instant| {
            d.saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1))
        };
        let handle: i64 = self
            .execute(
                "guest-file-open",
                Some(serde_json::json!({ "path": path, "mode": "r" })),
                left(deadline),
            )
            .await?;
        let mut data = Vec::new();
        let result = loop {
            let r: Result<FileRead, QgaError> = self
                .execute(
                    "guest-file-read",
                    Some(serde_json::json!({ "handle": handle, "count": READ_CHUNK })),
                    left(deadline),
                )
                .await;
            match r {
                Err(e) => break Err(e),
                Ok(chunk) => {
                    match base64::engine::general_purpose::STANDARD.decode(chunk.buf_b64.as_bytes())
                    {
                        Ok(b) => data.extend_from_slice(&b),
                        Err(e) => {
                            break Err(QgaError::Protocol(format!(
                                "guest-file-read of {path}: bad base64: {e}"
                            )))
                        }
                    }
                    if chunk.eof || chunk.count == 0 {
                        break Ok(());
                    }
                }
            }
        };
        // Close even after a failed read, so the agent does not keep the handle.
        let closed = self
            .execute_value(
                "guest-file-close",
                Some(serde_json::json!({ "handle": handle })),
                left(deadline),
            )
            .await;
        result?;
        closed?;
        Ok(data)
    }

    /// Read a guest text file, trimmed.
    pub async fn read_text(&mut self, path: &str, timeout: Duration) -> Result<String, QgaError> {
        let b = self.read_file(path, timeout).await?;
        Ok(String::from_utf8_lossy(&b).trim().to_string())
    }

    /// Seconds since the guest booted (`/proc/uptime`).
    pub async fn uptime(&mut self, timeout: Duration) -> Result<f64, QgaError> {
        let t = self.read_text("/proc/uptime", timeout).await?;
        t.split_whitespace()
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| QgaError::Protocol(format!("/proc/uptime reads {t:?}")))
    }

    /// `guest-shutdown` (`powerdown`, `halt` or `reboot`). The agent sends no reply.
    pub async fn shutdown(&mut self, mode: &str, timeout: Duration) -> Result<(), QgaError> {
        let deadline = Instant::now() + timeout;
        if !self.is_synced() {
            self.sync(timeout, Duration::from_millis(500).min(timeout))
                .await?;
        }
        let line = format!(
            "{{\"execute\": \"guest-shutdown\", \"arguments\": {{\"mode\": {}}}}}\n",
            Value::from(mode)
        );
        self.send(line.as_bytes(), "guest-shutdown", deadline, timeout)
            .await?;
        self.synced = false;
        Ok(())
    }
}

/// What `guest-get-osinfo`, `guest-get-host-name` and `guest-network-get-interfaces`
/// say of the guest, each optional (an old or minimal agent lacks some).
impl QgaClient {
    /// The guest's OS, host name and IP addresses. A command the agent does not have (or
    /// that fails) leaves its fields empty; only a broken channel is an error.
    pub async fn guest_info(
        &mut self,
        timeout: Duration,
    ) -> Result<corescale_api::GuestInfo, QgaError> {
        let mut info = corescale_api::GuestInfo::default();
        let text = |v: &Value, k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .map(str::to_string)
                .filter(|s| !s.is_empty())
        };
        match self.execute_value("guest-get-osinfo", None, timeout).await {
            Ok(v) => {
                info.os_name = text(&v, "pretty-name").or_else(|| text(&v, "name"));
                info.os_version = text(&v, "version-id");
                info.kernel_release = text(&v, "kernel-release");
            }
            Err(QgaError::Refused { .. }) => {}
            Err(e) => return Err(e),
        }
        match self
            .execute_value("guest-get-host-name", None, timeout)
            .await
        {
            Ok(v) => info.hostname = text(&v, "host-name"),
            Err(QgaError::Refused { .. }) => {}
            Err(e) => return Err(e),
        }
        match self
            .execute_value("guest-network-get-interfaces", None, timeout)
            .await
        {
            Ok(Value::Array(ifaces)) => {
                for i in &ifaces {
                    if text(i, "name").as_deref() == Some("lo") {
                        continue;
                    }
                    let addrs = i.get("ip-addresses").and_then(Value::as_array);
                    for a in addrs.into_iter().flatten() {
                        if let Some(ip) = text(a, "ip-address") {
                            // Link-local IPv6 addresses say nothing a user can reach.
                            if !ip.starts_with("fe80:") {
                                info.ip_addresses.push(ip);
                            }
                        }
                    }
                }
            }
            Ok(_) | Err(QgaError::Refused { .. }) => {}
            Err(e) => return Err(e),
        }
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acpi_path_names_the_slot_in_hex() {
        assert_eq!(slot_from_acpi_path("\\_SB_.CPUS.C001"), Some(1));
        assert_eq!(slot_from_acpi_path("\\_SB_.CPUS.C00A\n"), Some(10));
        assert_eq!(slot_from_acpi_path("\\_SB_.CPUS.C0FE"), Some(254));
        assert_eq!(slot_from_acpi_path("\\_SB_.PCI0"), None);
        assert_eq!(slot_from_acpi_path(""), None);
    }
}
