//! Scenarios `helm-upgrade` and `helm-uninstall`: README's commands for the release's life
//! after `helm install`, and what each does to the guests and leaves behind.

use super::pods::{node_vmm_pod, pods, wait_pod, OPERATOR_PODS};
use super::{host, Ctx, RELEASE, RELEASE_NS, VM, VM_NS};
use anyhow::{bail, ensure, Context as _, Result};
use corescale_api::FINALIZER;
use std::time::{Duration, Instant};

/// The tag the upgrade moves both images to (the same bits under a new name, as a
/// release upgrade would move them to new ones).
const UPGRADE_TAG_SUFFIX: &str = "-upgrade";

/// The image reference `helm-upgrade` moves a component to.
pub(super) fn upgraded(image: &str) -> String {
    format!("{image}{UPGRADE_TAG_SUFFIX}")
}

/// `helm-upgrade`: new image tags for both components with README's
/// `helm upgrade --wait=legacy` under the default `updateStrategy: OnDelete`.
pub(super) async fn upgrade(c: &Ctx) -> Result<String> {
    let s = &c.stack;
    let pod = node_vmm_pod(c).await?;
    let qemu = host::one_qemu(VM_NS, VM)?;
    let old_operator: Vec<String> = pods(c, OPERATOR_PODS)
        .await?
        .into_iter()
        .map(|p| p.uid)
        .collect();
    let op_new = upgraded(&c.operator_image);
    let nv_new = upgraded(&c.node_vmm_image);
    host::tag_image(&c.containerd, &c.operator_image, &op_new)?;
    host::tag_image(&c.containerd, &c.node_vmm_image, &nv_new)?;
    let tag = |r: &str| {
        r.rsplit_once(':')
            .map(|(_, t)| t.to_string())
            .unwrap_or_default()
    };

    // The node's image directory (`make guest-disk`'s Debian image beside the test kernel
    // and initramfs) replaces the image's own from the next pod on: scenario `workload`.
    let image_dir = crate::scenarios::workload::image_dir();
    let t0 = Instant::now();
    c.helm(&[
        "upgrade",
        RELEASE,
        &c.chart,
        "-n",
        RELEASE_NS,
        "--reuse-values",
        "--set",
        &format!("operator.image.tag={}", tag(&op_new)),
        "--set",
        &format!("nodeVmm.image.tag={}", tag(&nv_new)),
        "--set",
        &format!("nodeVmm.guestImages.hostPath={}", image_dir.display()),
        "--wait=legacy",
        "--timeout",
        "3m",
    ])?;
    let helm_secs = t0.elapsed().as_secs_f64();

    // The DaemonSet's template has the new image; its pod was not touched.
    let (ok, out, err) = s.kubectl(&[
        "get",
        "daemonset",
        "-n",
        RELEASE_NS,
        &format!("{RELEASE}-node-vmm"),
        "-o",
        "json",
    ])?;
    ensure!(ok, "kubectl get daemonset: {err}");
    let ds: serde_json::Value = serde_json::from_str(&out)?;
    let images: Vec<&str> = ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .context("DaemonSet without containers")?
        .iter()
        .filter_map(|x| x["image"].as_str())
        .collect();
    ensure!(
        images.iter().all(|i| *i == nv_new),
        "DaemonSet template images {images:?}, expected {nv_new}"
    );
    let host_paths: Vec<&str> = ds["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .context("DaemonSet without volumes")?
        .iter()
        .filter_map(|v| v["hostPath"]["path"].as_str())
        .collect();
    ensure!(
        host_paths.contains(&image_dir.to_string_lossy().as_ref()),
        "the DaemonSet template does not mount the node's image directory {}: hostPaths {host_paths:?}",
        image_dir.display()
    );
    ensure!(
        ds["spec"]["updateStrategy"]["type"] == "OnDelete",
        "updateStrategy {} (README's default is OnDelete)",
        ds["spec"]["updateStrategy"]
    );
    ensure!(
        ds["status"]["updatedNumberScheduled"].as_i64().unwrap_or(0) == 0,
        "OnDelete, yet {} pod(s) run the new template",
        ds["status"]["updatedNumberScheduled"]
    );
    let now = node_vmm_pod(c).await?;
    ensure!(
        now.uid == pod.uid,
        "the node-vmm pod was replaced by the upgrade"
    );
    for ctr in &now.containers {
        let was = pod.container(&ctr.name)?;
        ensure!(
            ctr.id == was.id && ctr.image == c.node_vmm_image,
            "container {} changed: {was:?} -> {ctr:?}",
            ctr.name
        );
    }
    ensure!(
        host::one_qemu(VM_NS, VM)? == qemu,
        "the guest's QEMU process changed (was {qemu:?})"
    );

    // The operator is a Deployment: it rolled to the new image (helm waited for it).
    let op = wait_pod(
        c,
        OPERATOR_PODS,
        "on the new image",
        Duration::from_secs(60),
        |p| !old_operator.contains(&p.uid) && p.containers.iter().all(|x| x.image == op_new),
    )
    .await?;
    // The new operator and the untouched agent resize the guest.
    let cpus = c.spec_cpus().await?;
    let to = if cpus > 1 { cpus - 1 } else { cpus + 1 };
    let resize = c.scale_and_check(to).await?;
    ensure!(
        host::one_qemu(VM_NS, VM)? == qemu,
        "the QEMU process changed while resizing"
    );
    Ok(format!(
        "helm upgrade --wait=legacy in {helm_secs:.1} s; operator pod {} on the new tag; node-vmm pod and QEMU pid {} untouched (DaemonSet updated 0 of 1); {cpus} -> {to} in {resize:.1} s",
        op.name, qemu.pid
    ))
}

/// `helm-uninstall`: README's `helm uninstall` with the VM still there.
pub(super) async fn uninstall(c: &Ctx) -> Result<String> {
    let s = &c.stack;
    let qemu = host::one_qemu(VM_NS, VM)?;
    let t0 = Instant::now();
    c.helm(&[
        "uninstall",
        RELEASE,
        "-n",
        RELEASE_NS,
        "--wait",
        "--timeout",
        "3m",
    ])?;
    let helm_secs = t0.elapsed().as_secs_f64();

    // Gone: every object of the release and, with the node-vmm pod, the guest.
    let selector = format!("app.kubernetes.io/instance={RELEASE}");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (ok, out, err) = s.kubectl(&[
            "get",
            "pods,daemonsets,deployments,services,serviceaccounts,roles,rolebindings,configmaps",
            "-n",
            RELEASE_NS,
            "-l",
            &selector,
            "-o",
            "name",
        ])?;
        ensure!(ok, "kubectl get: {err}");
        if out.trim().is_empty() {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "left in {RELEASE_NS} 90 s after helm uninstall: {}",
            out.trim()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (ok, out, err) = s.kubectl(&[
        "get",
        "clusterroles,clusterrolebindings,validatingadmissionpolicies,validatingadmissionpolicybindings,flowschemas",
        "-l",
        &selector,
        "-o",
        "name",
    ])?;
    ensure!(
        ok && out.trim().is_empty(),
        "cluster objects of the release left: {out}{err}"
    );
    host::wait_qemu(VM_NS, VM, "stopped", Duration::from_secs(60), |q| {
        q.is_empty()
    })
    .await
    .context("the guest outlived helm uninstall")?;
    ensure!(
        !host::qemu_of(VM_NS, VM).contains(&qemu),
        "QEMU {qemu:?} still runs"
    );

    // Left: what README says stays.
    let (ok, _, err) = s.kubectl(&["get", "crd", "virtualmachines.corescale.dev"])?;
    ensure!(
        ok,
        "the CRD is gone after helm uninstall (README says it stays): {err}"
    );
    let vm = s
        .vms(VM_NS)
        .get(VM)
        .await
        .context("the VM object is gone")?;
    ensure!(
        vm.metadata
            .finalizers
            .iter()
            .flatten()
            .any(|f| f == FINALIZER),
        "the VM lost its finalizer {FINALIZER}"
    );
    // No agent is left to report the stopped guest: status stays as last reported.
    let phase = vm.status.as_ref().and_then(|st| st.phase);
    ensure!(
        phase == Some(corescale_api::Phase::Running),
        "status.phase {phase:?} after helm uninstall; README says it stays as last reported (Running)"
    );
    let (ok, out, _) = s.kubectl(&[
        "get",
        "leases",
        "-n",
        RELEASE_NS,
        "-l",
        "corescale.dev/node-agent=true",
        "-o",
        "name",
    ])?;
    ensure!(
        ok && !out.trim().is_empty(),
        "no node-agent Lease left in {RELEASE_NS}"
    );
    let (ok, _, _) = s.kubectl(&[
        "get",
        "lease",
        "-n",
        RELEASE_NS,
        &format!("{RELEASE}-operator"),
    ])?;
    ensure!(ok, "the operator's leader-election Lease is gone");
    let (ok, _, _) = s.kubectl(&["get", "namespace", RELEASE_NS])?;
    ensure!(ok, "namespace {RELEASE_NS} is gone");
    let dir = host::vm_dir(VM_NS, VM);
    ensure!(dir.is_dir(), "{} is gone from the node", dir.display());

    // With no operator, nothing removes the finalizer: deleting the VM waits until an
    // admin removes it (README says how), then the object goes.
    let (ok, _, err) = s.kubectl(&["delete", "cvm", "-n", VM_NS, VM, "--wait=false"])?;
    ensure!(ok, "kubectl delete cvm: {err}");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let held = s.vms(VM_NS).get_opt(VM).await?;
    if held
        .as_ref()
        .is_none_or(|v| v.metadata.deletion_timestamp.is_none())
    {
        bail!("the deleted VM did not wait on its finalizer: {held:?}");
    }
    let (ok, _, err) = s.kubectl(&[
        "patch",
        "cvm",
        "-n",
        VM_NS,
        VM,
        "--type=json",
        "-p",
        r#"[{"op":"remove","path":"/metadata/finalizers"}]"#,
    ])?;
    ensure!(ok, "removing the finalizer: {err}");
    s.wait_gone(VM_NS, VM, Duration::from_secs(30)).await?;
    Ok(format!(
        "helm uninstall in {helm_secs:.1} s; pods, guest (QEMU pid {}) and release objects gone; CRD, VM (status still Running as last reported, finalizer held its deletion until removed by hand), node and operator Leases, namespace, {} remain",
        qemu.pid,
        dir.display()
    ))
}
