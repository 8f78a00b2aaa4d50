//! Scenarios `bad-manifests` and `refused-patch`: what the API server refuses, and that a
//! refused write leaves the running guest untouched.

use super::NS;
use crate::{node_of, Stack};
use anyhow::{ensure, Context as _, Result};
use corescale_api::VirtualMachine;
use std::time::Duration;

fn expect_line(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("# expect: "))
        .map(str::to_string)
}

/// `bad-manifests`: the generated CRD on a real API server: every bad manifest refused, naming the field;
/// bad updates refused too; good ones accepted (server-side dry run, nothing created).
pub(super) async fn bad_manifests(s: &Stack) -> Result<String> {
    let mut checked = 0;
    for sub in ["good", "bad", "bad-updates"] {
        let mut files: Vec<_> = std::fs::read_dir(s.repo.join("e2e/manifests").join(sub))?
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f)?;
            let fname = f.display().to_string();
            match sub {
                "good" => {
                    let (ok, _, err) = s.kubectl_with(
                        &["apply", "-n", NS, "--dry-run=server", "-f", "-"],
                        Some(&text),
                    )?;
                    ensure!(ok, "{fname} refused: {err}");
                }
                "bad" => {
                    let want =
                        expect_line(&text).with_context(|| format!("{fname}: no # expect line"))?;
                    let (ok, _, err) = s.kubectl_with(
                        &["apply", "-n", NS, "--dry-run=server", "-f", "-"],
                        Some(&text),
                    )?;
                    ensure!(!ok, "{fname} was accepted");
                    ensure!(
                        err.contains(&want),
                        "{fname}: error does not say {want:?}: {err}"
                    );
                }
                _ => {
                    let want =
                        expect_line(&text).with_context(|| format!("{fname}: no # expect line"))?;
                    let docs: Vec<&str> = text.split("\n---\n").collect();
                    ensure!(docs.len() == 2, "{fname}: needs two documents");
                    let ns = "manifests-update";
                    s.namespace(ns)?;
                    // The original is created for real, Halted so that no guest boots for it;
                    // the update is a server-side dry run against it.
                    let halted = |d: &str| -> Result<String> {
                        let mut v: serde_yaml::Value = serde_yaml::from_str(d)?;
                        v["spec"]["runStrategy"] = "Halted".into();
                        Ok(serde_yaml::to_string(&v)?)
                    };
                    let (ok, _, err) =
                        s.kubectl_with(&["apply", "-n", ns, "-f", "-"], Some(&halted(docs[0])?))?;
                    ensure!(ok, "{fname}: original refused: {err}");
                    let (ok, _, err) = s.kubectl_with(
                        &["apply", "-n", ns, "--dry-run=server", "-f", "-"],
                        Some(&halted(docs[1])?),
                    )?;
                    let name = serde_yaml::from_str::<serde_yaml::Value>(docs[0])?["metadata"]
                        ["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string();
                    let _ = s.kubectl(&["delete", "cvm", "-n", ns, &name, "--wait=false"]);
                    ensure!(!ok, "{fname}: the update was accepted");
                    ensure!(
                        err.contains(&want),
                        "{fname}: error does not say {want:?}: {err}"
                    );
                }
            }
            checked += 1;
        }
    }
    // kubectl explain shows descriptions from the Rust doc comments.
    let (ok, out, err) = s.kubectl(&["explain", "cvm.spec.granularity"])?;
    ensure!(
        ok && out.contains("whole core"),
        "kubectl explain: {out}{err}"
    );
    Ok(format!(
        "{checked} manifests checked against kube-apiserver {}",
        s.var("CORESCALE_KUBE_VERSION").unwrap_or("?")
    ))
}

/// `refused-patch`: a patch the API server refuses changes nothing in the guest.
pub(super) async fn refused_patch(s: &Stack) -> Result<String> {
    let before = s.vms(NS).get("example").await?;
    let node = node_of(&before).context("no node")?;
    let qemu = s.qemu(&node, NS, "example").context("no QEMU")?;
    let (ok, _, err) = s.kubectl(&[
        "patch",
        "cvm",
        "-n",
        NS,
        "example",
        "--type=merge",
        "-p",
        r#"{"spec":{"cpus":9}}"#,
    ])?;
    ensure!(
        !ok && err.contains("spec.cpus must not exceed the VM's maximum"),
        "patch to 9: {err}"
    );
    let (ok, _, err) = s.kubectl(&[
        "patch",
        "cvm",
        "-n",
        NS,
        "example",
        "--type=merge",
        "-p",
        r#"{"spec":{"topology":{"sockets":1,"cores":16,"threads":1}}}"#,
    ])?;
    ensure!(
        !ok && err.contains("spec.topology is immutable"),
        "topology patch: {err}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = s.vms(NS).get("example").await?;
    ensure!(after.spec == before.spec, "spec changed");
    let vc = |v: &VirtualMachine| v.status.as_ref().map(|s| s.vcpus.clone());
    ensure!(vc(&after) == vc(&before), "vCPU states changed");
    ensure!(s.qemu(&node, NS, "example") == Some(qemu), "QEMU changed");
    Ok("cpus 9 and a topology change refused; spec, vCPUs and QEMU unchanged".into())
}
