//! QMP's messages: the greeting, events (the ones the backend acts on typed), the CPU
//! lists of `query-hotpluggable-cpus` and `query-cpus-fast`, and the decoding of one line
//! QEMU sent into an event or a reply.

use super::QmpError;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Seconds and microseconds since the epoch, as QMP stamps events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Timestamp {
    /// Seconds.
    pub seconds: i64,
    /// Microseconds.
    pub microseconds: i64,
}

/// QEMU's version from the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct QemuVersion {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
    /// Micro.
    pub micro: u32,
}

#[derive(Debug, Deserialize)]
pub(super) struct GreetingMsg {
    #[serde(rename = "QMP")]
    pub(super) qmp: GreetingBody,
}

#[derive(Debug, Deserialize)]
pub(super) struct GreetingBody {
    pub(super) version: GreetingVersion,
    #[serde(default)]
    pub(super) capabilities: Vec<String>,
}

#[derive(Debug, Deserialize)]
pub(super) struct GreetingVersion {
    pub(super) qemu: QemuVersion,
    #[serde(default)]
    pub(super) package: String,
}

/// What QEMU said when the connection opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    /// QEMU's version.
    pub version: QemuVersion,
    /// Distribution package string.
    pub package: String,
    /// Offered capabilities (e.g. "oob").
    pub capabilities: Vec<String>,
}

/// One asynchronous event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Event name, e.g. `ACPI_DEVICE_OST`.
    pub event: String,
    /// Event data (an empty object when QEMU sends none).
    #[serde(default)]
    pub data: Value,
    /// When QEMU emitted it.
    #[serde(default)]
    pub timestamp: Timestamp,
}

/// `ACPIOSTInfo`: the guest's `_OST` report on a hot-plug slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcpiOstInfo {
    /// The device id, when the device still exists (absent on the final eject report).
    #[serde(default)]
    pub device: Option<String>,
    /// Slot number as a string; for CPUs it is QEMU's possible-CPU index, the slot index.
    pub slot: String,
    /// "CPU", "DIMM", ...
    #[serde(rename = "slot-type")]
    pub slot_type: String,
    /// ACPI _OST source event: 1 insert (device check), 3 eject request.
    pub source: i64,
    /// ACPI _OST status: 0 success, 0x80 and above: in progress or failure.
    pub status: i64,
}

/// `_OST` source of an insert notification (device check).
pub const OST_SOURCE_INSERT: i64 = 1;
/// `_OST` source of an eject request.
pub const OST_SOURCE_EJECT: i64 = 3;
/// `_OST` status "success".
pub const OST_STATUS_SUCCESS: i64 = 0;
/// `_OST` status "eject in progress" (the guest reports it before the final status).
pub const OST_STATUS_EJECT_IN_PROGRESS: i64 = 0x84;

/// The events the backend acts on, typed; everything else is `Other`.
#[derive(Debug, Clone, PartialEq)]
pub enum EventKind {
    /// `ACPI_DEVICE_OST`.
    AcpiDeviceOst(AcpiOstInfo),
    /// `SHUTDOWN`: the guest (or QMP `quit`/a signal) shut the machine down.
    Shutdown {
        /// Whether the guest initiated it.
        guest: bool,
        /// QEMU's reason string.
        reason: String,
    },
    /// `STOP`: the VM paused.
    Stop,
    /// `RESUME`: the VM runs again.
    Resume,
    /// `DEVICE_DELETED`.
    DeviceDeleted {
        /// Device id, if it had one.
        device: Option<String>,
        /// QOM path.
        path: String,
    },
    /// Any other event, by name.
    Other(String),
}

impl Event {
    /// The typed view of this event.
    pub fn kind(&self) -> EventKind {
        match self.event.as_str() {
            "ACPI_DEVICE_OST" => match self.data.get("info").cloned().map(serde_json::from_value) {
                Some(Ok(info)) => EventKind::AcpiDeviceOst(info),
                _ => EventKind::Other(self.event.clone()),
            },
            "SHUTDOWN" => EventKind::Shutdown {
                guest: self
                    .data
                    .get("guest")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
                reason: self
                    .data
                    .get("reason")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
            },
            "STOP" => EventKind::Stop,
            "RESUME" => EventKind::Resume,
            "DEVICE_DELETED" => EventKind::DeviceDeleted {
                device: self
                    .data
                    .get("device")
                    .and_then(Value::as_str)
                    .map(str::to_string),
                path: self
                    .data
                    .get("path")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
            },
            _ => EventKind::Other(self.event.clone()),
        }
    }

    /// The `_OST` info if this is an `ACPI_DEVICE_OST` event.
    pub fn acpi_ost(&self) -> Option<AcpiOstInfo> {
        match self.kind() {
            EventKind::AcpiDeviceOst(info) => Some(info),
            _ => None,
        }
    }
}

/// `CpuInstanceProperties`: where a CPU sits. Unknown properties (newer QEMU) are kept and
/// passed back verbatim to `device_add`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct CpuProps {
    /// NUMA node.
    #[serde(rename = "node-id", default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<i64>,
    /// Socket.
    #[serde(rename = "socket-id", default, skip_serializing_if = "Option::is_none")]
    pub socket_id: Option<i64>,
    /// Die.
    #[serde(rename = "die-id", default, skip_serializing_if = "Option::is_none")]
    pub die_id: Option<i64>,
    /// Module.
    #[serde(rename = "module-id", default, skip_serializing_if = "Option::is_none")]
    pub module_id: Option<i64>,
    /// Core.
    #[serde(rename = "core-id", default, skip_serializing_if = "Option::is_none")]
    pub core_id: Option<i64>,
    /// Thread.
    #[serde(rename = "thread-id", default, skip_serializing_if = "Option::is_none")]
    pub thread_id: Option<i64>,
    /// Properties this layer does not name.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// One entry of `query-hotpluggable-cpus`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HotpluggableCpu {
    /// The CPU device type to `device_add`.
    #[serde(rename = "type")]
    pub type_: String,
    /// vCPUs in this entry (1 on x86: one entry per thread).
    #[serde(rename = "vcpus-count")]
    pub vcpus_count: i64,
    /// Topology properties.
    pub props: CpuProps,
    /// QOM path when a CPU is plugged in the slot.
    #[serde(rename = "qom-path", default)]
    pub qom_path: Option<String>,
}

/// One entry of `query-cpus-fast`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuInfoFast {
    /// QEMU's CPU index.
    #[serde(rename = "cpu-index")]
    pub cpu_index: i64,
    /// QOM path of the CPU.
    #[serde(rename = "qom-path")]
    pub qom_path: String,
    /// Host thread id of the vCPU.
    #[serde(rename = "thread-id")]
    pub thread_id: i64,
    /// Topology properties.
    #[serde(default)]
    pub props: CpuProps,
    /// Target architecture.
    #[serde(default)]
    pub target: String,
}

/// `query-status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInfo {
    /// Whether vCPUs run.
    pub running: bool,
    /// "running", "paused", "shutdown", ...
    pub status: String,
}

#[derive(Debug, Deserialize)]
pub(super) struct ErrorBody {
    pub(super) class: String,
    pub(super) desc: String,
}

/// One message from QEMU, decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// An asynchronous event.
    Event(Event),
    /// A successful reply to the command with this id.
    Return {
        /// The command's id.
        id: u64,
        /// Its `return` value.
        value: Value,
    },
    /// An error reply to the command with this id.
    Error {
        /// The command's id.
        id: u64,
        /// QMP error class (`GenericError` when QEMU sent none).
        class: String,
        /// QEMU's description.
        desc: String,
    },
}

/// Decode one line QEMU sent: `Ok(None)` for a blank line, an error for anything that is not
/// a QMP event or a reply with an id (the reader logs and skips it; the stream goes on).
/// Public so that the decoding can be fuzzed on its own.
pub fn decode_line(line: &str) -> Result<Option<Incoming>, QmpError> {
    if line.trim().is_empty() {
        return Ok(None);
    }
    let v: Value = serde_json::from_str(line)
        .map_err(|e| QmpError::Protocol(format!("a line that is not JSON: {e}")))?;
    if v.get("event").is_some() {
        return serde_json::from_value::<Event>(v)
            .map(|ev| Some(Incoming::Event(ev)))
            .map_err(|e| QmpError::Protocol(format!("an event with an unexpected shape: {e}")));
    }
    let Some(id) = v.get("id").and_then(Value::as_u64) else {
        return Err(QmpError::Protocol(
            "a message that is neither an event nor a reply with a known id".into(),
        ));
    };
    if let Some(r) = v.get("return") {
        return Ok(Some(Incoming::Return {
            id,
            value: r.clone(),
        }));
    }
    match v.get("error") {
        Some(e) => {
            let body = serde_json::from_value(e.clone()).unwrap_or(ErrorBody {
                class: "GenericError".into(),
                desc: e.to_string(),
            });
            Ok(Some(Incoming::Error {
                id,
                class: body.class,
                desc: body.desc,
            }))
        }
        None => Err(QmpError::Protocol(format!(
            "a reply to command {id} with neither return nor error"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_ost_events_qemu_10_sends() {
        // Lines as QEMU 10.0.2 sent them (node-vmm/guest/smoke.py transcript).
        let insert: Event = serde_json::from_str(r#"{"timestamp": {"seconds": 1795316341, "microseconds": 198379}, "event": "ACPI_DEVICE_OST", "data": {"info": {"device": "cpu-s0-c1-t0", "source": 1, "status": 0, "slot": "1", "slot-type": "CPU"}}}"#).unwrap();
        let info = insert.acpi_ost().unwrap();
        assert_eq!(info.device.as_deref(), Some("cpu-s0-c1-t0"));
        assert_eq!(
            (info.source, info.status, info.slot.as_str()),
            (OST_SOURCE_INSERT, 0, "1")
        );
        let eject: Event = serde_json::from_str(r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "ACPI_DEVICE_OST", "data": {"info": {"source": 3, "status": 0, "slot": "1", "slot-type": "CPU"}}}"#).unwrap();
        let info = eject.acpi_ost().unwrap();
        assert_eq!(info.device, None);
        assert_eq!(info.source, OST_SOURCE_EJECT);
        let unknown: Event = serde_json::from_str(r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "NETDEV_VHOST_USER_CONNECTED", "data": {"netdev-id": "x"}}"#).unwrap();
        assert_eq!(
            unknown.kind(),
            EventKind::Other("NETDEV_VHOST_USER_CONNECTED".into())
        );
        let stop: Event = serde_json::from_str(
            r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}"#,
        )
        .unwrap();
        assert_eq!(stop.kind(), EventKind::Stop);
    }

    #[test]
    fn cpu_props_round_trip_keeps_unknown_fields() {
        let v = serde_json::json!({"props": {"core-id": 3, "thread-id": 0, "socket-id": 0, "cluster-id": 0}, "vcpus-count": 1, "type": "qemu64-x86_64-cpu"});
        let c: HotpluggableCpu = serde_json::from_value(v).unwrap();
        assert_eq!(c.props.core_id, Some(3));
        assert_eq!(c.qom_path, None);
        let back = serde_json::to_value(&c.props).unwrap();
        assert_eq!(
            back,
            serde_json::json!({"core-id": 3, "thread-id": 0, "socket-id": 0, "cluster-id": 0})
        );
    }
}
