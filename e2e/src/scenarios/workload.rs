//! e2e scenario `workload`: a VM that does real work, from `examples/workload.yaml`: the
//! Debian disk image (`make guest-disk`) as a copy-on-write root disk, an empty data disk,
//! cloud-init user data from a Secret (readable by the node agent only once a Role lets
//! it), an SSH key, and two forwarded ports. The test reaches the guest's HTTP service
//! and logs in over SSH; a CPU-bound job spreads over the vCPUs as the VM is scaled
//! 1 -> 4; data written to both disks survives an agent restart and a guest reboot; the
//! base image is never written; bad input is refused naming the field.

use super::guest_ssh::{busy_cores, Ssh};
use crate::{condition, node_of, Stack};
use anyhow::{bail, ensure, Context as _, Result};
use corescale_api::{Phase, VirtualMachine};
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub(crate) const NAME: &str = "web";
/// A Debian guest with systemd and cloud-init boots in minutes under TCG.
pub(crate) const BOOT: Duration = Duration::from_secs(600);
pub(crate) const CONVERGE: Duration = Duration::from_secs(120);
/// How long each CPU measurement window lasts.
const WINDOW: Duration = Duration::from_secs(15);

pub(crate) fn image_dir() -> PathBuf {
    let cache = std::env::var_os("CORESCALE_CACHE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/corescale")
        });
    cache.join("guest")
}

fn sha256(path: &std::path::Path) -> Result<String> {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .context("sha256sum (coreutils)")?;
    ensure!(out.status.success(), "sha256sum {}", path.display());
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// The documents of examples/workload.yaml with the test's key, split by kind.
fn example(s: &Stack, pubkey: &str) -> Result<(String, String)> {
    let text = std::fs::read_to_string(s.repo.join("examples/workload.yaml"))?;
    ensure!(
        text.contains("ssh-ed25519 REPLACE-ME"),
        "examples/workload.yaml has no key placeholder"
    );
    let text = text.replace("ssh-ed25519 REPLACE-ME", pubkey.trim());
    let (mut rbac, mut rest) = (Vec::new(), Vec::new());
    for doc in text.split("\n---\n") {
        if doc.contains("kind: Role") {
            rbac.push(doc);
        } else {
            rest.push(doc);
        }
    }
    ensure!(
        rbac.len() == 2,
        "examples/workload.yaml: a Role and a RoleBinding"
    );
    Ok((rest.join("\n---\n"), rbac.join("\n---\n")))
}

pub(crate) fn port_of(vm: &VirtualMachine, name: &str) -> Option<(String, u32)> {
    vm.status
        .as_ref()?
        .ports
        .iter()
        .find(|p| p.name == name)
        .map(|p| (p.host_ip.clone(), p.host_port))
}

/// Running, its agent connected, its OS reported, and cloud-init's host name and the
/// DHCP address in place.
pub(crate) fn booted(vm: &VirtualMachine) -> bool {
    vm.status.as_ref().is_some_and(|s| {
        s.phase == Some(Phase::Running)
            && s.guest_agent.as_deref() == Some("Connected")
            && s.guest.as_ref().is_some_and(|g| {
                g.os_name.as_deref().is_some_and(|n| n.contains("Debian"))
                    && g.hostname.as_deref() == Some(NAME)
                    && !g.ip_addresses.is_empty()
            })
    })
}

pub(crate) async fn wait_event(
    s: &Stack,
    ns: &str,
    name: &str,
    reason: &str,
    needle: &str,
) -> Result<String> {
    let t0 = Instant::now();
    loop {
        let ev = s.events(ns, name)?;
        if let Some((_, note)) = ev.iter().find(|(r, n)| r == reason && n.contains(needle)) {
            return Ok(note.clone());
        }
        if t0.elapsed() > CONVERGE {
            bail!(
                "{ns}/{name}: no {reason} Event saying {needle:?} in {} s: {ev:?}",
                CONVERGE.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The Debian base image in the node's image directory and its SHA-256 (to show that no VM
/// ever writes it).
pub(crate) fn base_image() -> Result<(PathBuf, String)> {
    let base = image_dir().join("x86_64/debian/disk.qcow2");
    ensure!(
        base.is_file(),
        "{} is missing: build the Debian guest image with `make guest-disk`",
        base.display()
    );
    let sum = sha256(&base)?;
    Ok((base, sum))
}

/// The base image still has the SHA-256 [`base_image`] gave.
pub(crate) fn base_unchanged(base: &std::path::Path, sum: &str) -> Result<()> {
    ensure!(
        sha256(base)? == sum,
        "the base image {} changed",
        base.display()
    );
    Ok(())
}

/// A fresh SSH key in the stack's private directory (ssh-keygen will not overwrite one) and
/// the example's documents with its public key: (VM and Secret, Role and RoleBinding).
pub(crate) async fn key_and_example(s: &Stack) -> Result<(Ssh, String, String)> {
    let keydir = s.dir.join("workload-ssh");
    let _ = std::fs::remove_dir_all(&keydir);
    std::fs::create_dir_all(&keydir)?;
    let ssh = Ssh::new(&keydir).await?;
    let (vm_docs, rbac) = example(s, &ssh.public_key()?)?;
    Ok((ssh, vm_docs, rbac))
}

/// The page the example's cloud-init serves, from `url`; waits up to [`BOOT`].
pub(crate) async fn serves_page(url: &str) -> Result<String> {
    let t0 = Instant::now();
    loop {
        // Bounded: the forwarded port accepts before the guest's service does, and such a
        // connection can stay open with no answer.
        match tokio::time::timeout(Duration::from_secs(5), crate::http_get(url)).await {
            Ok(Ok(b)) if b.contains("hello from a corescale VM") => return Ok(b),
            r if t0.elapsed() > BOOT => bail!("{url} never served the page: {r:?}"),
            _ => tokio::time::sleep(Duration::from_secs(2)).await,
        }
    }
}

/// Apply the example's VM and Secret without the Role: the start is refused naming the
/// field (the node agent may not read the Secret); then apply the Role and RoleBinding.
pub(crate) async fn apply_then_allow(s: &Stack, ns: &str, vm_docs: &str, rbac: &str) -> Result<()> {
    let (ok, _, err) = s.kubectl_with(&["apply", "-n", ns, "-f", "-"], Some(vm_docs))?;
    ensure!(ok, "applying examples/workload.yaml: {err}");
    let denied = wait_event(s, ns, NAME, "StartFailed", "may not read Secret").await?;
    ensure!(
        denied.starts_with("spec.cloudInit.userDataSecretRef.name:"),
        "the refusal names the field: {denied}"
    );
    let (ok, _, err) = s.kubectl_with(&["apply", "-n", ns, "-f", "-"], Some(rbac))?;
    ensure!(ok, "applying the Role: {err}");
    Ok(())
}

/// A VM that must not start: its Event names `field`, and no QEMU runs for it.
async fn refused(s: &Stack, ns: &str, name: &str, extra: &str, field: &str) -> Result<String> {
    let yaml = format!(
        "apiVersion: corescale.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: {name}}}\nspec:\n  cpus: 1\n{extra}"
    );
    s.create(ns, &yaml).await?;
    let note = wait_event(s, ns, name, "StartFailed", field).await?;
    ensure!(
        s.qemu_processes(ns, name).is_empty(),
        "{name}: a QEMU runs although the start was refused"
    );
    s.delete(ns, name).await?;
    s.wait_gone(ns, name, CONVERGE).await?;
    Ok(note)
}

/// Attach `corescale-node-vmm console` to the guest, press Enter, detach with Ctrl-]: the
/// getty's login prompt must come back. Returns the prompt line.
async fn console_login_prompt(s: &Stack, node: &str, ns: &str) -> Result<String> {
    let bin = std::env::current_exe()?
        .parent()
        .context("no binary directory")?
        .join("corescale-node-vmm");
    let state = s.dir.join("nodes").join(node).join("vms");
    let mut cmd = tokio::process::Command::new(&bin);
    cmd.args([
        "console",
        &format!("{ns}/{NAME}"),
        "--tail",
        "0",
        "--state-dir",
    ])
    .arg(&state);
    login_prompt(cmd).await
}

/// Run `cmd` (a `corescale-node-vmm console` attached to the guest, directly or through
/// `kubectl exec -i`), press Enter, detach with Ctrl-]: the getty's login prompt must come
/// back. Returns the prompt line.
pub(crate) async fn login_prompt(mut cmd: tokio::process::Command) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let shown = format!("{:?}", cmd.as_std());
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("running {shown}"))?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let mut stdout = child.stdout.take().context("stdout")?;
    let reader = tokio::spawn(async move {
        let mut out = Vec::new();
        let _ = stdout.read_to_end(&mut out).await;
        out
    });
    for _ in 0..3 {
        stdin.write_all(b"\r").await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    stdin.write_all(&[0x1d]).await?;
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .with_context(|| format!("the console did not detach on Ctrl-] ({shown})"))??;
    let out =
        String::from_utf8_lossy(&tokio::time::timeout(Duration::from_secs(5), reader).await??)
            .into_owned();
    ensure!(status.success(), "{shown} exited {status}: {out}");
    out.lines()
        .map(str::trim)
        .find(|l| l.ends_with("login:"))
        .map(str::to_string)
        .with_context(|| format!("no login prompt on the console: {out:?}"))
}

/// Start a CPU-bound job of four busy loops in the guest at 1 vCPU, scale the VM to 4 and
/// measure again: the job must run on every vCPU and do more work. Returns the guest's
/// busy cores at 1 and at 4 vCPUs.
pub(crate) async fn job_spreads(
    s: &Stack,
    ns: &str,
    ssh: &Ssh,
    host: &str,
    port: u32,
) -> Result<(f64, f64)> {
    ssh.run(host, port, "for i in 1 2 3 4; do nohup timeout 600 sh -c 'while :; do :; done' </dev/null >/dev/null 2>&1 & done; echo started").await?;
    let one = busy_cores(ssh, host, port, WINDOW).await?;
    s.scale(ns, NAME, 4).await?;
    s.wait_online(ns, NAME, 4, CONVERGE).await?;
    let four = busy_cores(ssh, host, port, WINDOW).await?;
    let _ = ssh.run(host, port, "pkill -x timeout; true").await;
    let (one, total) = (one.iter().sum::<f64>(), four.iter().sum::<f64>());
    ensure!(
        four.len() == 4,
        "the guest sees {} CPUs at 4 vCPUs",
        four.len()
    );
    ensure!(
        four.iter().all(|c| *c >= 0.15),
        "the job runs on every vCPU: busy cores per CPU {four:?}"
    );
    ensure!(
        total >= 1.2 * one,
        "more vCPUs do more work: {one:.2} busy cores at 1 vCPU, {total:.2} at 4"
    );
    Ok((one, total))
}

/// Data on both disks: [`Marks::write`] puts a mark on the root file system and the raw
/// data disk, [`Marks::check`] reads both back after `what` happened to the guest.
pub(crate) struct Marks {
    read: String,
    want: String,
}

impl Marks {
    /// Write the marks through `ssh`.
    pub(crate) async fn write(ssh: &Ssh, host: &str, port: u32) -> Result<Self> {
        let mark = format!("corescale-{}", std::process::id());
        ssh.run(
            host,
            port,
            &format!("echo {mark} | sudo tee /var/tmp/mark >/dev/null && printf {mark} | sudo dd of=/dev/disk/by-id/virtio-data conv=fsync status=none && sync && echo ok"),
        )
        .await?;
        Ok(Marks {
            read: format!(
                "sudo cat /var/tmp/mark; sudo head -c {} /dev/disk/by-id/virtio-data; echo",
                mark.len()
            ),
            want: format!("{mark}\n{mark}"),
        })
    }

    /// Both marks are still there after `what`.
    pub(crate) async fn check(&self, ssh: &Ssh, host: &str, port: u32, what: &str) -> Result<()> {
        let got = ssh.run(host, port, &self.read).await?;
        ensure!(
            got.trim() == self.want,
            "after {what} the disks hold {got:?}, not {:?}",
            self.want
        );
        Ok(())
    }
}

/// Run the scenario in namespace `ns`.
pub async fn workload(s: &Stack, ns: &str) -> Result<String> {
    let (base, base_sum) = base_image()?;
    let (ssh, vm_docs, rbac) = key_and_example(s).await?;

    // 1. The Secret is not readable by the node agent yet: the start is refused, saying so.
    let t0 = Instant::now();
    apply_then_allow(s, ns, &vm_docs, &rbac).await?;

    // 2. It boots from its disk; status shows the OS and the forwarded ports.
    let vm = s.wait_vm(ns, NAME, "booted Debian", BOOT, booted).await?;
    let boot_s = t0.elapsed().as_secs_f64();
    let node = node_of(&vm).context("no node")?;
    let qemu = s.qemu(&node, ns, NAME).context("no QEMU")?;
    let (host, http) = port_of(&vm, "http").context("no http port in status")?;
    let (_, ssh_port) = port_of(&vm, "ssh").context("no ssh port in status")?;
    let guest = vm
        .status
        .as_ref()
        .and_then(|st| st.guest.clone())
        .unwrap_or_default();
    ensure!(
        guest.ip_addresses.iter().any(|a| a.starts_with("10.0.2.")),
        "the guest has its user-mode network address: {guest:?}"
    );

    // 3. The HTTP service cloud-init started answers through the forwarded port.
    let page = serves_page(&format!("http://{host}:{http}/")).await?;
    let http_s = t0.elapsed().as_secs_f64();

    // 4. SSH with the key from spec.cloudInit.sshAuthorizedKeys.
    let login = ssh.wait(&host, ssh_port, BOOT).await?;
    ensure!(login.trim() == "1", "nproc at 1 vCPU: {login}");

    // 5. The serial console, through `corescale-node-vmm console`: a getty answers.
    let console = console_login_prompt(s, &node, ns).await?;

    // 6. A CPU-bound job spreads over the vCPUs as the VM grows 1 -> 4.
    let (one, four) = job_spreads(s, ns, &ssh, &host, ssh_port).await?;

    // 7. Data on the root and the data disk survives an agent restart...
    let marks = Marks::write(&ssh, &host, ssh_port).await?;
    s.stack(&["agent", "kill", &node])?;
    s.stack(&["agent", "start", &node])?;
    s.wait_online(ns, NAME, 4, CONVERGE).await?;
    ensure!(
        s.qemu(&node, ns, NAME) == Some(qemu),
        "the agent restart restarted the guest"
    );
    marks
        .check(&ssh, &host, ssh_port, "the agent restart")
        .await?;

    // 8. ... and a guest reboot (its VMM ends with the reset and starts again, same disks).
    let _ = ssh.run(&host, ssh_port, "sudo systemctl reboot").await;
    wait_event(s, ns, NAME, "Rebooted", "same disks").await?;
    let vm = s
        .wait_vm(ns, NAME, "booted again", BOOT, |vm| {
            booted(vm) && s.qemu(&node, ns, NAME).is_some_and(|q| q != qemu)
        })
        .await?;
    ensure!(
        port_of(&vm, "ssh") == Some((host.clone(), ssh_port)),
        "the reboot kept the ssh port: {:?}",
        port_of(&vm, "ssh")
    );
    ssh.wait(&host, ssh_port, BOOT).await?;
    marks.check(&ssh, &host, ssh_port, "the reboot").await?;
    ensure!(
        condition(&vm, "Running").is_some_and(|c| c.status == "True"),
        "Running after the reboot"
    );

    // 9. Bad input is refused naming the field, and no guest starts.
    let held = std::net::TcpListener::bind((host.as_str(), 0))?;
    let taken = held.local_addr()?.port();
    let port_note = refused(
        s,
        ns,
        "web-port-taken",
        &format!("  ports: [{{name: http, guestPort: 80, hostPort: {taken}}}]\n"),
        "spec.ports[0].hostPort",
    )
    .await?;
    drop(held);
    ensure!(port_note.contains(&taken.to_string()), "{port_note}");
    refused(
        s,
        ns,
        "web-no-image",
        "  disks: [{name: root, image: x86_64/debian/no-such-image.qcow2}]\n",
        "spec.disks[0].image",
    )
    .await?;

    // 10. Deleting the VM removes its disks; the base image was never written.
    let disks = s
        .dir
        .join("nodes")
        .join(&node)
        .join("vms/.disks")
        .join(ns)
        .join(NAME);
    ensure!(
        disks.join("root.qcow2").is_file(),
        "no overlay at {}",
        disks.display()
    );
    s.delete(ns, NAME).await?;
    s.wait_gone(ns, NAME, CONVERGE).await?;
    ensure!(
        !disks.exists(),
        "{} survived the VM's deletion",
        disks.display()
    );
    base_unchanged(&base, &base_sum)?;
    let _ = s.kubectl_with(
        &["delete", "-n", ns, "-f", "-", "--ignore-not-found"],
        Some(&rbac),
    );
    ensure!(page.contains("hello"), "{page}");
    Ok(format!(
        "Debian booted from its disk in {boot_s:.0} s (HTTP at {http_s:.0} s), ssh and console ({console}) ok; job {one:.2} -> {four:.2} busy cores at 1 -> 4 vCPUs; disks kept across agent restart and reboot; base image unchanged"
    ))
}
