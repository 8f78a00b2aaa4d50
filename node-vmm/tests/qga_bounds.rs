//! The guest agent client returns within its deadline whatever sits at the other end of the
//! socket: an agent that never reads (its requests pile up until the socket's buffer is
//! full and a write would block for good), one that answers only garbage, and one that
//! restarts every second. Fake agents on a socket; `qemu_agent_bounds.rs` plays the same
//! with real guests.

mod common;

use common::within;
use corescale_node_vmm::backend::qemu::qga::{QgaClient, QgaError};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;

/// Slack for the scheduler on a loaded 2-core machine.
const MARGIN: Duration = Duration::from_millis(700);

fn socket() -> (tempfile::TempDir, std::path::PathBuf, UnixListener) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qga.sock");
    let listener = UnixListener::bind(&path).unwrap();
    (dir, path, listener)
}

/// The agent's end is connected but nobody reads it, as with a guest whose agent never
/// opened its port: QEMU stops reading the socket, the kernel's buffer fills, and a plain
/// write blocks forever. Each resync attempt writes a request, so quick attempts fill it.
#[tokio::test]
async fn an_agent_that_never_reads_times_out() {
    let (_dir, path, listener) = socket();
    let server = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        // Hold the connection, read nothing, answer nothing.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        drop(s);
    });
    let mut c = QgaClient::new(&path);
    let t = Duration::from_secs(2);
    let e = within("sync", t, MARGIN, c.sync(t, Duration::from_millis(1)))
        .await
        .unwrap_err();
    assert!(matches!(e, QgaError::Timeout { .. }), "{e:?}");
    // Every command, on a connection whose buffer is full or a fresh one.
    for _ in 0..3 {
        let e = within("ping", t, MARGIN, c.ping(t)).await.unwrap_err();
        assert!(matches!(e, QgaError::Timeout { .. }), "{e:?}");
    }
    let e = within(
        "get_vcpus",
        Duration::from_millis(300),
        MARGIN,
        c.get_vcpus(Duration::from_millis(300)),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, QgaError::Timeout { .. }), "{e:?}");
    server.abort();
}

/// An agent that reads everything and answers only garbage: bytes that are not JSON,
/// objects cut off, replies with ids that are not ours, and a flood of them.
#[tokio::test]
async fn an_agent_that_answers_garbage_times_out() {
    let (_dir, path, listener) = socket();
    let server = tokio::spawn(async move {
        loop {
            let (s, _) = listener.accept().await.unwrap();
            let (mut r, mut w) = s.into_split();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = r.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            });
            tokio::spawn(async move {
                let junk: &[u8] = b"corescale garbage {\"return\": [1, \n{\"return\": 1}\n\xff{\"id\": 7, \"return\": {}}\nnot json\n{\"error\": {}}\n";
                while w.write_all(junk).await.is_ok() {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            });
        }
    });
    let mut c = QgaClient::new(&path);
    let t = Duration::from_secs(1);
    let e = within("sync", t, MARGIN, c.sync(t, Duration::from_millis(50)))
        .await
        .unwrap_err();
    assert!(matches!(e, QgaError::Timeout { .. }), "{e:?}");
    let e = within("ping", t, MARGIN, c.ping(t)).await.unwrap_err();
    assert!(matches!(e, QgaError::Timeout { .. }), "{e:?}");
    let e = within("read_file", t, MARGIN, c.read_file("/proc/uptime", t))
        .await
        .unwrap_err();
    assert!(matches!(e, QgaError::Timeout { .. }), "{e:?}");
    server.abort();
}

/// An agent that restarts every second: each connection is answered for a while, then
/// closed mid-conversation. Calls either succeed or fail, always within their deadline.
#[tokio::test]
async fn an_agent_that_restarts_every_second_stays_within_deadlines() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let (_dir, path, listener) = socket();
    let server = tokio::spawn(async move {
        loop {
            let (s, _) = listener.accept().await.unwrap();
            let conn = async move {
                let (r, mut w) = s.into_split();
                let mut lines = BufReader::new(r).split(b'\n');
                while let Ok(Some(raw)) = lines.next_segment().await {
                    let body = raw.strip_prefix(&[0xFF][..]).unwrap_or(&raw);
                    let Ok(req) = serde_json::from_slice::<serde_json::Value>(body) else {
                        continue;
                    };
                    let bytes = if req["execute"] == "guest-sync-delimited" {
                        let mut b = vec![0xFF];
                        b.extend(format!("{{\"return\": {}}}\n", req["arguments"]["id"]).bytes());
                        b
                    } else {
                        // Slow enough that some calls meet the restart.
                        tokio::time::sleep(Duration::from_millis(150)).await;
                        format!("{{\"return\": {{}}, \"id\": {}}}\n", req["id"]).into_bytes()
                    };
                    if w.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
            };
            // The agent is killed after a second, whatever it was doing.
            let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
        }
    });
    let mut c = QgaClient::new(&path);
    let t = Duration::from_millis(800);
    let (mut ok, mut failed) = (0, 0);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(4) {
        match within("ping", t, MARGIN, c.ping(t)).await {
            Ok(()) => ok += 1,
            Err(e) => {
                failed += 1;
                assert!(
                    matches!(e, QgaError::Timeout { .. } | QgaError::Closed),
                    "{e:?}"
                );
            }
        }
    }
    println!("restarting agent: {ok} pings answered, {failed} cut short");
    assert!(
        ok > 0,
        "an agent that is up most of the time answers some pings"
    );
    server.abort();
}
