//! A minimal direct QMP + guest-agent client: the baseline the benchmarks hold the backend
//! and the whole control plane against. It does one x86 plug or unplug the shortest way
//! the protocol allows (no planning, no state, no status): `device_add`, the insert
//! `ACPI_DEVICE_OST`, the new CPU found by `guest-get-vcpus`, `guest-set-vcpus`, confirmed
//! online; or offline through the agent, `device_del`, the final eject `ACPI_DEVICE_OST`.
//!
//! Blocking I/O on purpose (plain sockets, no runtime): nothing between the caller and the
//! VMM but the kernel. Run it from `spawn_blocking` inside an async program.

use crate::launcher;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};
use thiserror::Error;

/// What went wrong talking to the VMM or the guest directly.
#[derive(Debug, Error)]
pub enum DirectError {
    /// A socket failed (connect, read, write, timeout).
    #[error("{what}: {source}")]
    Io {
        /// Which socket and step.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// QEMU or the guest agent answered with an error, or closed the line.
    #[error("{0}")]
    Protocol(String),
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> DirectError {
    move |source| DirectError::Io { what, source }
}

/// Phase times of one direct plug, from its start.
#[derive(Debug, Clone, Copy)]
pub struct PlugTimes {
    /// `device_add` returned.
    pub applied: Duration,
    /// The guest's insert `_OST`.
    pub acked: Duration,
    /// The agent lists the new CPU online.
    pub online: Duration,
    /// The guest's logical id of the new CPU.
    pub logical: u64,
}

/// Phase times of one direct unplug, from its start.
#[derive(Debug, Clone, Copy)]
pub struct UnplugTimes {
    /// Offlined through the agent and `device_del` returned.
    pub applied: Duration,
    /// The final eject `_OST`.
    pub acked: Duration,
}

/// Direct connections to one VM's QMP monitor and guest agent.
pub struct DirectClient {
    qmp: BufReader<UnixStream>,
    qga: UnixStream,
    qga_buf: Vec<u8>,
    id: u64,
    /// QMP events read while waiting for a command's reply, oldest first.
    events: std::collections::VecDeque<Value>,
}

impl DirectClient {
    /// Connect to the sockets in a VM's state directory (nobody else may hold them: QEMU
    /// serves one client on each) and synchronise the agent's line.
    pub fn connect(dir: &Path, timeout: Duration) -> Result<Self, DirectError> {
        let q = UnixStream::connect(dir.join(launcher::QMP_SOCK)).map_err(io("QMP connect"))?;
        q.set_read_timeout(Some(timeout))
            .map_err(io("QMP socket"))?;
        let mut qmp = BufReader::new(q);
        let mut greeting = String::new();
        qmp.read_line(&mut greeting).map_err(io("QMP greeting"))?;
        if !greeting.contains("QMP") {
            return Err(DirectError::Protocol(format!(
                "no QMP greeting: {greeting:?}"
            )));
        }
        let qga = UnixStream::connect(dir.join(launcher::QGA_SOCK)).map_err(io("QGA connect"))?;
        qga.set_read_timeout(Some(timeout))
            .map_err(io("QGA socket"))?;
        let mut d = DirectClient {
            qmp,
            qga,
            qga_buf: Vec::new(),
            id: 1,
            events: std::collections::VecDeque::new(),
        };
        d.qmp_cmd(json!({"execute": "qmp_capabilities"}))?;
        // Resynchronise the agent line: 0xFF, then guest-sync-delimited until our id.
        d.id += 1;
        let id = d.id;
        // 0xFF (a raw byte, not UTF-8) makes the agent drop whatever half line it holds.
        let mut bytes = vec![0xFF];
        bytes.extend_from_slice(
            format!("{{\"execute\":\"guest-sync-delimited\",\"arguments\":{{\"id\":{id}}}}}\n")
                .as_bytes(),
        );
        d.qga.write_all(&bytes).map_err(io("QGA write"))?;
        loop {
            let v = d.qga_obj()?;
            if v.get("return").and_then(Value::as_u64) == Some(id) {
                return Ok(d);
            }
        }
    }

    fn qmp_line(&mut self) -> Result<Value, DirectError> {
        let mut line = String::new();
        self.qmp.read_line(&mut line).map_err(io("QMP read"))?;
        if line.is_empty() {
            return Err(DirectError::Protocol("QMP closed".into()));
        }
        serde_json::from_str(&line)
            .map_err(|e| DirectError::Protocol(format!("QMP sent {line:?}: {e}")))
    }

    /// Run a QMP command; its reply (events before it are skipped).
    pub fn qmp_cmd(&mut self, cmd: Value) -> Result<Value, DirectError> {
        let mut b = serde_json::to_vec(&cmd).map_err(|e| DirectError::Protocol(e.to_string()))?;
        b.push(b'\n');
        self.qmp.get_mut().write_all(&b).map_err(io("QMP write"))?;
        loop {
            let v = self.qmp_line()?;
            if v.get("event").is_none() {
                if let Some(e) = v.get("error") {
                    return Err(DirectError::Protocol(format!("QMP error: {e}")));
                }
                return Ok(v);
            }
            self.events.push_back(v);
        }
    }

    /// The next QMP event: one read while a command ran, or the next line.
    fn next_event(&mut self) -> Result<Value, DirectError> {
        match self.events.pop_front() {
            Some(v) => Ok(v),
            None => self.qmp_line(),
        }
    }

    /// `device_add` of the x86 slot `entry` (from [`DirectClient::slot`]) as device `id`.
    fn device_add(&mut self, entry: &Value, id: &str) -> Result<(), DirectError> {
        let mut args = entry["props"].as_object().cloned().unwrap_or_default();
        args.insert("driver".into(), entry["type"].clone());
        args.insert("id".into(), json!(id));
        self.qmp_cmd(json!({"execute": "device_add", "arguments": args}))
            .map(|_| ())
    }

    fn qga_obj(&mut self) -> Result<Value, DirectError> {
        loop {
            if let Some(start) = self.qga_buf.iter().position(|&b| b == b'{') {
                let mut it = serde_json::Deserializer::from_slice(&self.qga_buf[start..])
                    .into_iter::<Value>();
                if let Some(Ok(v)) = it.next() {
                    let end = start + it.byte_offset();
                    self.qga_buf.drain(..end);
                    return Ok(v);
                }
            }
            let mut chunk = [0u8; 65536];
            let n = self.qga.read(&mut chunk).map_err(io("QGA read"))?;
            if n == 0 {
                return Err(DirectError::Protocol(
                    "the guest agent's line closed".into(),
                ));
            }
            self.qga_buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Run a guest agent command; its `return` value.
    pub fn qga_cmd(&mut self, execute: &str, arguments: Value) -> Result<Value, DirectError> {
        self.id += 1;
        let id = self.id;
        let mut b =
            serde_json::to_vec(&json!({"execute": execute, "arguments": arguments, "id": id}))
                .map_err(|e| DirectError::Protocol(e.to_string()))?;
        b.push(b'\n');
        self.qga.write_all(&b).map_err(io("QGA write"))?;
        loop {
            let v = self.qga_obj()?;
            if v.get("id").and_then(Value::as_u64) == Some(id) {
                if let Some(e) = v.get("error") {
                    return Err(DirectError::Protocol(format!("{execute}: {e}")));
                }
                return Ok(v["return"].clone());
            }
        }
    }

    /// The guest's logical CPUs and whether each is online.
    pub fn vcpus(&mut self) -> Result<Vec<(u64, bool)>, DirectError> {
        let v = self.qga_cmd("guest-get-vcpus", json!({}))?;
        Ok(v.as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter_map(|c| Some((c["logical-id"].as_u64()?, c["online"].as_bool()?)))
            .collect())
    }

    /// The `query-hotpluggable-cpus` entry of x86 slot `(socket, core, thread)`.
    pub fn slot(&mut self, socket: i64, core: i64, thread: i64) -> Result<Value, DirectError> {
        let list = self.qmp_cmd(json!({"execute": "query-hotpluggable-cpus"}))?;
        list["return"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .find(|c| {
                c["props"]["socket-id"] == socket
                    && c["props"]["core-id"] == core
                    && c["props"]["thread-id"] == thread
            })
            .cloned()
            .ok_or_else(|| {
                DirectError::Protocol(format!(
                    "no slot socket {socket} core {core} thread {thread}"
                ))
            })
    }

    /// Plug the x86 slot `entry` (from [`DirectClient::slot`]) as device `id`, whose ACPI
    /// slot number is `acpi_slot`, and bring the new CPU online.
    pub fn plug_online(
        &mut self,
        entry: &Value,
        id: &str,
        acpi_slot: u32,
    ) -> Result<PlugTimes, DirectError> {
        let before: Vec<u64> = self.vcpus()?.into_iter().map(|(l, _)| l).collect();
        let t0 = Instant::now();
        self.device_add(entry, id)?;
        let applied = t0.elapsed();
        self.wait_osts(&[acpi_slot.to_string()], 1)?;
        let acked = t0.elapsed();
        let logical = loop {
            if let Some((l, _)) = self.vcpus()?.into_iter().find(|(l, _)| !before.contains(l)) {
                break l;
            }
        };
        self.qga_cmd(
            "guest-set-vcpus",
            json!({"vcpus": [{"logical-id": logical, "online": true}]}),
        )?;
        while !self.vcpus()?.into_iter().any(|(l, on)| l == logical && on) {}
        Ok(PlugTimes {
            applied,
            acked,
            online: t0.elapsed(),
            logical,
        })
    }

    /// Plug several x86 slots at once, the shortest way: every `device_add`, then every
    /// insert `_OST`, then one `guest-set-vcpus` for all the new CPUs, until the agent lists
    /// them online. `plugs` holds (entry, device id, ACPI slot); returns the new logical
    /// ids and the time it took.
    pub fn plug_online_many(
        &mut self,
        plugs: &[(Value, String, u32)],
    ) -> Result<(Vec<u64>, Duration), DirectError> {
        let before: Vec<u64> = self.vcpus()?.into_iter().map(|(l, _)| l).collect();
        let t0 = Instant::now();
        for (entry, id, _) in plugs {
            self.device_add(entry, id)?;
        }
        let slots: Vec<String> = plugs.iter().map(|p| p.2.to_string()).collect();
        self.wait_osts(&slots, 1)?;
        let new = loop {
            let new: Vec<u64> = self
                .vcpus()?
                .into_iter()
                .map(|(l, _)| l)
                .filter(|l| !before.contains(l))
                .collect();
            if new.len() == plugs.len() {
                break new;
            }
        };
        let set: Vec<Value> = new
            .iter()
            .map(|l| json!({"logical-id": l, "online": true}))
            .collect();
        self.qga_cmd("guest-set-vcpus", json!({ "vcpus": set }))?;
        while !self
            .vcpus()?
            .into_iter()
            .filter(|(l, _)| new.contains(l))
            .all(|(_, on)| on)
        {}
        Ok((new, t0.elapsed()))
    }

    /// Unplug several x86 slots at once: one `guest-set-vcpus` offlining every CPU, every
    /// `device_del`, then every eject `_OST`. `unplugs` holds (device id, logical id, ACPI
    /// slot).
    pub fn unplug_many(&mut self, unplugs: &[(String, u64, u32)]) -> Result<Duration, DirectError> {
        let t0 = Instant::now();
        let set: Vec<Value> = unplugs
            .iter()
            .map(|u| json!({"logical-id": u.1, "online": false}))
            .collect();
        self.qga_cmd("guest-set-vcpus", json!({ "vcpus": set }))?;
        for (id, _, _) in unplugs {
            self.qmp_cmd(json!({"execute": "device_del", "arguments": {"id": id}}))?;
        }
        let slots: Vec<String> = unplugs.iter().map(|u| u.2.to_string()).collect();
        self.wait_osts(&slots, 3)?;
        Ok(t0.elapsed())
    }

    /// Online (or offline) present guest CPUs the shortest way, as under GuestOnline: one
    /// `guest-set-vcpus` for all of `logical` (done when it reports all changed, else
    /// `guest-get-vcpus` until it lists them so). Returns the time it took.
    pub fn set_online_many(
        &mut self,
        logical: &[u64],
        online: bool,
    ) -> Result<Duration, DirectError> {
        let t0 = Instant::now();
        let set: Vec<Value> = logical
            .iter()
            .map(|l| json!({"logical-id": l, "online": online}))
            .collect();
        let done = self.qga_cmd("guest-set-vcpus", json!({ "vcpus": set }))?;
        // Every CPU changed: each sysfs write returned after the kernel did it.
        if done.as_u64() == u64::try_from(logical.len()).ok() {
            return Ok(t0.elapsed());
        }
        while !self
            .vcpus()?
            .into_iter()
            .filter(|(l, _)| logical.contains(l))
            .all(|(_, on)| on == online)
        {
            if t0.elapsed() > Duration::from_secs(30) {
                return Err(DirectError::Protocol(format!(
                    "the guest did not set CPUs {logical:?} online={online} within 30 s"
                )));
            }
        }
        Ok(t0.elapsed())
    }

    /// Wait for a successful `ACPI_DEVICE_OST` of `source` from every slot of `slots`
    /// (events that came while a command ran are in the stream as well).
    fn wait_osts(&mut self, slots: &[String], source: i64) -> Result<(), DirectError> {
        let mut left: Vec<&String> = slots.iter().collect();
        while !left.is_empty() {
            let v = self.next_event()?;
            let info = &v["data"]["info"];
            if v["event"] == "ACPI_DEVICE_OST" && info["source"] == source && info["status"] == 0 {
                left.retain(|s| info["slot"] != s.as_str());
            }
        }
        Ok(())
    }

    /// Offline guest CPU `logical` and unplug device `id` (ACPI slot `acpi_slot`).
    pub fn unplug(
        &mut self,
        id: &str,
        logical: u64,
        acpi_slot: u32,
    ) -> Result<UnplugTimes, DirectError> {
        let t0 = Instant::now();
        self.qga_cmd(
            "guest-set-vcpus",
            json!({"vcpus": [{"logical-id": logical, "online": false}]}),
        )?;
        self.qmp_cmd(json!({"execute": "device_del", "arguments": {"id": id}}))?;
        let applied = t0.elapsed();
        self.wait_osts(&[acpi_slot.to_string()], 3)?;
        Ok(UnplugTimes {
            applied,
            acked: t0.elapsed(),
        })
    }
}
