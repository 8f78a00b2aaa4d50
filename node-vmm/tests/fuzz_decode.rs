//! Fuzzing what the node decodes from a VMM and from a guest (issue 8, part 5).
//!
//! QEMU and the guest agent are the node's untrusted inputs: the guest agent runs inside the
//! guest, and a QEMU build we did not test may say things we do not expect. Whatever comes
//! over those sockets must never panic the agent, and a malformed message must fail at most
//! the command it answers: the connection (and so every other VM's and every later step)
//! goes on.
//!
//! * `qmp::decode_line`: arbitrary bytes, arbitrary JSON values, JSON shaped like QMP events
//!   and replies with wrong types; the typed views of an event (`kind`, `acpi_ost`) too.
//! * `qga::next_object`: arbitrary bytes fed in arbitrary chunks; valid replies interleaved
//!   with garbage, `0xFF` delimiters and torn (truncated) objects are all recovered, in order.
//! * A fake QMP server over a unix socket answers one command with garbage lines (random
//!   text, invalid UTF-8, JSON of the wrong shape): that command fails with a typed error and
//!   the next command on the same client succeeds.

use corescale_node_vmm::backend::qemu::qga::next_object;
use corescale_node_vmm::backend::qemu::qmp::{decode_line, Incoming, QmpClient, QmpError};
use proptest::prelude::*;
use serde_json::{json, Map, Value};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Arbitrary JSON values, nested a few levels.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(key(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Object keys: mostly the ones QMP uses, so decoding goes deep, sometimes anything.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => proptest::sample::select(vec![
            "event", "data", "timestamp", "id", "return", "error", "class", "desc", "info",
            "slot", "slot-type", "source", "status", "device", "guest", "reason", "path",
            "seconds", "microseconds", "QMP",
        ])
        .prop_map(str::to_string),
        1 => ".{0,8}",
    ]
}

/// JSON shaped like what QEMU sends, with any value in any field.
fn qmp_shaped() -> impl Strategy<Value = Value> {
    let event_name = prop_oneof![
        proptest::sample::select(vec![
            "ACPI_DEVICE_OST",
            "SHUTDOWN",
            "STOP",
            "RESUME",
            "DEVICE_DELETED",
            "SOMETHING_NEW",
        ])
        .prop_map(Value::from),
        json_value(),
    ];
    let ost_info = (json_value(), json_value(), json_value(), json_value(), json_value())
        .prop_map(|(slot, ty, source, status, device)| {
            json!({"slot": slot, "slot-type": ty, "source": source, "status": status, "device": device})
        });
    prop_oneof![
        (event_name, json_value(), json_value())
            .prop_map(|(e, data, ts)| json!({"event": e, "data": data, "timestamp": ts})),
        (ost_info, json_value()).prop_map(|(info, ts)| {
            json!({"event": "ACPI_DEVICE_OST", "data": {"info": info}, "timestamp": ts})
        }),
        (json_value(), json_value()).prop_map(|(id, r)| json!({"id": id, "return": r})),
        (json_value(), json_value()).prop_map(|(id, e)| json!({"id": id, "error": e})),
        (any::<u64>(), json_value(), json_value())
            .prop_map(|(id, c, d)| json!({"id": id, "error": {"class": c, "desc": d}})),
        json_value(),
    ]
}

/// Decoding one line must not panic, and what it returns must be consistent with the line.
fn check_line(line: &str) -> Result<(), TestCaseError> {
    match decode_line(line) {
        Ok(None) => prop_assert!(
            line.trim().is_empty(),
            "a non-blank line decoded to nothing"
        ),
        Ok(Some(Incoming::Event(ev))) => {
            // The typed views must not panic either, whatever the data holds.
            let _ = ev.kind();
            let _ = ev.acpi_ost();
        }
        Ok(Some(Incoming::Return { id, .. } | Incoming::Error { id, .. })) => {
            let v: Value = serde_json::from_str(line).expect("a decoded reply is JSON");
            prop_assert_eq!(v.get("id").and_then(Value::as_u64), Some(id));
        }
        Err(QmpError::Protocol(m)) => prop_assert!(!m.is_empty()),
        Err(e) => prop_assert!(false, "decode_line gave a non-protocol error: {e:?}"),
    }
    Ok(())
}

/// Garbage between guest-agent replies: no braces or quotes (so it cannot open an object),
/// ended by a newline or a `0xFF` delimiter.
fn garbage() -> impl Strategy<Value = Vec<u8>> {
    (
        proptest::collection::vec(
            prop_oneof![
                proptest::sample::select(b"abcxyz019 :,]\t\r".to_vec()),
                0x80u8..0xFF
            ],
            0..20,
        ),
        prop_oneof![Just(b'\n'), Just(0xFFu8)],
    )
        .prop_map(|(mut g, end)| {
            g.push(end);
            g
        })
}

/// One piece of a guest-agent stream: a reply we must recover (its marker), garbage, or a
/// torn object (a strict prefix of an object, cut anywhere, then a newline or `0xFF`).
#[derive(Debug, Clone)]
enum Piece {
    Reply(u64, Value),
    Garbage(Vec<u8>),
    Torn(Vec<u8>, usize, u8),
}

fn piece() -> impl Strategy<Value = Piece> {
    prop_oneof![
        3 => (any::<u64>(), json_value()).prop_map(|(id, r)| Piece::Reply(id, r)),
        1 => garbage().prop_map(Piece::Garbage),
        1 => (json_value(), any::<usize>(), prop_oneof![Just(b'\n'), Just(0xFFu8)]).prop_map(
            |(v, cut, end)| {
                let bytes = serde_json::to_vec(&json!({"return": v, "id": 1})).unwrap();
                Piece::Torn(bytes, cut, end)
            }
        ),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn qmp_decoding_never_panics_on_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        check_line(&String::from_utf8_lossy(&bytes))?;
    }

    #[test]
    fn qmp_decoding_never_panics_on_json(v in prop_oneof![qmp_shaped(), json_value()]) {
        let line = serde_json::to_string(&v).unwrap();
        check_line(&line)?;
        // Truncated frames: every prefix that is a char boundary.
        for cut in (0..line.len()).step_by(7) {
            if line.is_char_boundary(cut) {
                check_line(&line[..cut])?;
            }
        }
    }

    #[test]
    fn qmp_replies_with_a_u64_id_are_matched(id in any::<u64>(), r in json_value()) {
        let line = serde_json::to_string(&json!({"return": r, "id": id})).unwrap();
        // Compared with the value as JSON text carries it (floats do not round-trip exactly).
        let value = serde_json::from_str::<Value>(&line).unwrap()["return"].take();
        prop_assert_eq!(decode_line(&line), Ok(Some(Incoming::Return { id, value })));
    }

    #[test]
    fn qga_reader_never_panics_and_always_makes_progress(
        bytes in proptest::collection::vec(any::<u8>(), 0..400),
        chunk in 1usize..64,
    ) {
        let mut buf = Vec::new();
        for part in bytes.chunks(chunk) {
            buf.extend_from_slice(part);
            let mut rounds = 0;
            while let Some(v) = next_object(&mut buf) {
                prop_assert!(v.is_object(), "next_object returned a non-object: {v}");
                rounds += 1;
                prop_assert!(rounds <= bytes.len(), "next_object does not consume its input");
            }
            // What stays buffered is at most an object still being received.
            prop_assert!(buf.is_empty() || buf[0] == b'{', "garbage left at the front: {buf:?}");
        }
    }

    #[test]
    fn qga_reader_recovers_every_reply_between_garbage_and_torn_frames(
        pieces in proptest::collection::vec(piece(), 0..12),
        chunk in 1usize..80,
    ) {
        let mut stream = Vec::new();
        let mut want = Vec::new();
        for (n, p) in pieces.iter().enumerate() {
            match p {
                Piece::Reply(id, r) => {
                    // A unique marker per reply, so we can find ours among any extra objects.
                    let marker = format!("reply-{n}");
                    let obj = json!({"return": r, "id": id, "marker": marker});
                    stream.extend(serde_json::to_vec(&obj).unwrap());
                    want.push(marker);
                }
                Piece::Garbage(g) => stream.extend(g),
                Piece::Torn(bytes, cut, end) => {
                    stream.extend(&bytes[..cut % bytes.len()]);
                    stream.push(*end);
                }
            }
        }
        let mut buf = Vec::new();
        let mut got = Vec::new();
        for part in stream.chunks(chunk) {
            buf.extend_from_slice(part);
            while let Some(v) = next_object(&mut buf) {
                if let Some(m) = v.get("marker").and_then(Value::as_str) {
                    got.push(m.to_string());
                }
            }
        }
        prop_assert_eq!(got, want, "stream: {}", String::from_utf8_lossy(&stream));
    }
}

/// Bytes a broken QMP peer could send in place of a reply, one line each.
fn malformed_lines() -> impl Strategy<Value = Vec<Vec<u8>>> {
    proptest::collection::vec(
        prop_oneof![
            proptest::collection::vec(any::<u8>().prop_filter("one line", |b| *b != b'\n'), 0..80),
            json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
            qmp_shaped().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        ],
        0..8,
    )
}

const GREETING: &[u8] = b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 10}, \"package\": \"fuzz\"}, \"capabilities\": []}}\n";

/// A fake QMP server: greets, accepts capabilities, answers the first command with the
/// malformed lines and then a reply of the wrong shape, and the second properly.
async fn fake_qmp_round(lines: Vec<Vec<u8>>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let server = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let (r, mut w) = s.into_split();
        let mut r = BufReader::new(r).lines();
        w.write_all(GREETING).await.unwrap();
        let mut next = async || -> Value {
            serde_json::from_str(&r.next_line().await.unwrap().unwrap()).unwrap()
        };
        let caps = next().await;
        w.write_all(format!("{{\"return\": {{}}, \"id\": {}}}\n", caps["id"]).as_bytes())
            .await
            .unwrap();
        let first = next().await;
        assert_eq!(first["execute"], "query-status");
        for mut l in lines {
            l.push(b'\n');
            w.write_all(&l).await.unwrap();
        }
        // The reply to the first command, of a shape query-status never has.
        w.write_all(format!("{{\"return\": [1, \"two\"], \"id\": {}}}\n", first["id"]).as_bytes())
            .await
            .unwrap();
        let second = next().await;
        w.write_all(
            format!(
                "{{\"return\": {{\"running\": true, \"status\": \"running\"}}, \"id\": {}}}\n",
                second["id"]
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        // Hold the connection until the client is done.
        let _ = r.next_line().await;
    });
    let t = Duration::from_secs(5);
    let qmp = QmpClient::connect(&path, t).await.expect("connects");
    let first = qmp.query_status(t).await;
    assert!(
        // Refused when a random line happened to be an error reply with this command's id.
        matches!(first, Err(QmpError::Protocol(_) | QmpError::Refused { .. })),
        "the malformed reply fails its command with a typed error, got {first:?}"
    );
    let second = qmp
        .query_status(t)
        .await
        .expect("the client is still usable");
    assert!(second.running);
    assert!(!qmp.is_closed());
    drop(qmp);
    server.await.unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn a_malformed_qmp_reply_fails_only_its_command(lines in malformed_lines()) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(fake_qmp_round(lines));
    }
}

/// The cases most likely to break a line reader, written out: invalid UTF-8, a NUL, a
/// line that is only the `0xFF` delimiter, an event without a name, a reply with a
/// negative or string id.
#[tokio::test]
async fn known_bad_lines_fail_only_their_command() {
    fake_qmp_round(vec![
        vec![0xC3, 0x28, b'{', 0xFF, 0xFE],
        b"\0".to_vec(),
        vec![0xFF],
        b"{\"event\": 42}".to_vec(),
        b"{\"id\": -1, \"return\": {}}".to_vec(),
        b"{\"id\": \"1\", \"return\": {}}".to_vec(),
        b"{\"event\": \"ACPI_DEVICE_OST\", \"data\": {\"info\": {\"slot\": 1e999}}}".to_vec(),
    ])
    .await;
}
