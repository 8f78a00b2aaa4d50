//! Scenario `core`: a Core-granularity VM (threads=2) scales by whole cores.

use super::support::no_split_core;
use super::{BOOT, CONVERGE, NS};
use crate::Stack;
use anyhow::{ensure, Result};

/// `core`: Core granularity with threads=2: whole cores.
pub(super) async fn core(s: &Stack) -> Result<String> {
    let yaml = "apiVersion: corescale.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {name: smt}\n\
                spec: {cpus: 2, minCpus: 2, granularity: Core, topology: {sockets: 1, cores: 3, threads: 2}}\n";
    s.create(NS, yaml).await?;
    s.wait_online(NS, "smt", 2, BOOT).await?;
    for n in [4u32, 2, 4] {
        s.scale(NS, "smt", n).await?;
        let vm = s.wait_online(NS, "smt", n, CONVERGE).await?;
        no_split_core(&vm)?;
    }
    // A target that is not whole cores is refused at admission.
    let (ok, _, err) = s.kubectl(&["scale", "-n", NS, "cvm/smt", "--replicas=3"])?;
    ensure!(
        !ok && err.contains("multiples of spec.topology.threads"),
        "scale to 3: {err}"
    );
    Ok("2 -> 4 -> 2 -> 4 vCPUs, both threads of a core each time; 3 refused".into())
}
