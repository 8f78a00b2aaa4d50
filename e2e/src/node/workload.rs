//! Scenario `workload`: README's "Running a workload" on the chart's pods. The Debian VM of
//! examples/workload.yaml boots inside the launcher container from the node's image
//! directory (the release's `nodeVmm.guestImages.hostPath`, which `helm-upgrade` set and
//! `pod-delete` rolled out); the node agent's ServiceAccount reads its cloud-init Secret
//! only once the example's Role lets it; its ports listen in the node-vmm pod and status
//! advertises the pod IP; docs/workloads.md's selectorless Service and EndpointSlice reach
//! it through kube-proxy; ssh works, and the console through `kubectl exec` as README says;
//! a job spreads over the vCPUs 1 -> 4; data on both disks survives the agent container's
//! SIGKILL; deleting the VM removes its disks from the node's state directory; the base
//! image is never written.

use super::pods::node_vmm_pod;
use super::restart::kill_agent;
use super::{host, Ctx, RELEASE_NS, VM, VM_NS};
use crate::scenarios::workload::{self as w, NAME};
use anyhow::{ensure, Context as _, Result};
use std::path::PathBuf;
use std::time::Instant;

/// docs/workloads.md's Service and EndpointSlice for the guest's `http` port at `ip:port`.
fn service_yaml(ip: &str, port: u32) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {NAME}}}
spec:
  ports: [{{name: http, port: 80, targetPort: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {NAME}-1
  labels: {{kubernetes.io/service-name: {NAME}}}
addressType: IPv4
ports: [{{name: http, port: {port}}}]
endpoints: [{{addresses: [\"{ip}\"]}}]
"
    )
}

/// `workload`, after `pod-delete` (whose new pod mounts the node's image directory).
pub(super) async fn workload(c: &Ctx) -> Result<String> {
    let s = &c.stack;
    let (base, base_sum) = w::base_image()?;
    let (ssh, vm_docs, rbac) = w::key_and_example(s).await?;

    // 1. Refused until the Role lets the chart's ServiceAccount read the Secret.
    let t0 = Instant::now();
    w::apply_then_allow(s, VM_NS, &vm_docs, &rbac).await?;

    // 2. Debian boots in the launcher container; its ports are at the pod's IP.
    let vm = s
        .wait_vm(VM_NS, NAME, "booted Debian", w::BOOT, w::booted)
        .await?;
    let boot_s = t0.elapsed().as_secs_f64();
    let pod = node_vmm_pod(c).await?;
    let qemu = host::one_qemu(VM_NS, NAME)?;
    let (ip, http) = w::port_of(&vm, "http").context("no http port in status")?;
    let (ssh_ip, ssh_port) = w::port_of(&vm, "ssh").context("no ssh port in status")?;
    ensure!(
        ip == pod.ip && ssh_ip == pod.ip,
        "status.ports advertise {ip} and {ssh_ip}, not the node-vmm pod's IP {}",
        pod.ip
    );

    // 3. The page, at the pod IP and through a Service (kube-proxy's rules on the node).
    let page = w::serves_page(&format!("http://{ip}:{http}/")).await?;
    let http_s = t0.elapsed().as_secs_f64();
    let (ok, _, err) = s.kubectl_with(
        &["apply", "-n", VM_NS, "-f", "-"],
        Some(&service_yaml(&ip, http)),
    )?;
    ensure!(ok, "applying the Service and EndpointSlice: {err}");
    let (ok, cluster_ip, err) = s.kubectl(&[
        "get",
        "service",
        "-n",
        VM_NS,
        NAME,
        "-o",
        "jsonpath={.spec.clusterIP}",
    ])?;
    ensure!(
        ok && !cluster_ip.is_empty(),
        "the Service's clusterIP: {err}"
    );
    w::serves_page(&format!("http://{cluster_ip}:80/")).await?;

    // 4. SSH with the key from spec.cloudInit.sshAuthorizedKeys.
    let login = ssh.wait(&ip, ssh_port, w::BOOT).await?;
    ensure!(login.trim() == "1", "nproc at 1 vCPU: {login}");

    // 5. The console, as README says: `kubectl exec` into the launcher container.
    let mut exec = tokio::process::Command::new(s.var("CORESCALE_KUBECTL").unwrap_or("kubectl"));
    exec.env("KUBECONFIG", s.var("KUBECONFIG")?).args([
        "exec",
        "-i",
        "-n",
        RELEASE_NS,
        &pod.name,
        "-c",
        "launcher",
        "--",
        "corescale-node-vmm",
        "console",
        &format!("{VM_NS}/{NAME}"),
        "--tail",
        "0",
    ]);
    let console = w::login_prompt(exec).await?;

    // 6. A CPU-bound job spreads over the vCPUs as the VM grows 1 -> 4.
    let (one, four) = w::job_spreads(s, VM_NS, &ssh, &ip, ssh_port).await?;

    // 7. The disks are on the node (the chart's hostPath state directory) and survive the
    // agent container's SIGKILL: the launcher's QEMU keeps running, the new agent adopts it.
    let disks = PathBuf::from(host::STATE_DIR)
        .join(".disks")
        .join(VM_NS)
        .join(NAME);
    for d in ["root.qcow2", "data.qcow2"] {
        ensure!(
            disks.join(d).is_file(),
            "no {d} on the node at {}",
            disks.display()
        );
    }
    let marks = w::Marks::write(&ssh, &ip, ssh_port).await?;
    let (_, agent_s) = kill_agent(c, &[VM, NAME]).await?;
    s.wait_online(VM_NS, NAME, 4, w::CONVERGE).await?;
    ensure!(
        host::one_qemu(VM_NS, NAME)? == qemu,
        "the agent's restart restarted the guest (QEMU was {qemu:?})"
    );
    marks
        .check(&ssh, &ip, ssh_port, "the agent container's restart")
        .await?;

    // 8. Deleting the VM removes its disks from the node; the base image was never written.
    s.delete(VM_NS, NAME).await?;
    s.wait_gone(VM_NS, NAME, w::CONVERGE).await?;
    ensure!(
        !disks.exists(),
        "{} survived the VM's deletion",
        disks.display()
    );
    w::base_unchanged(&base, &base_sum)?;
    for (what, docs) in [
        ("Service", service_yaml(&ip, http)),
        ("Role", rbac.clone()),
        ("Secret", vm_docs.clone()),
    ] {
        let (ok, _, err) = s.kubectl_with(
            &["delete", "-n", VM_NS, "-f", "-", "--ignore-not-found"],
            Some(&docs),
        )?;
        ensure!(ok, "deleting the {what}: {err}");
    }
    ensure!(page.contains("hello"), "{page}");
    Ok(format!(
        "Debian booted in the launcher container from the node's images in {boot_s:.0} s (HTTP at the pod IP at {http_s:.0} s, and through a Service); ssh and console via kubectl exec ({console}) ok; job {one:.2} -> {four:.2} busy cores at 1 -> 4 vCPUs; disks kept across the agent's SIGKILL ({agent_s:.1} s), removed with the VM"
    ))
}
