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

const NAME: &str = "web";
/// A Debian guest with systemd and cloud-init boots in minutes under TCG.
const BOOT: Duration = Duration::from_secs(600);
const CONVERGE: Duration = Duration::from_secs(120);
/// How long each CPU measurement window lasts.
const WINDOW: Duration = Duration::from_secs(15);

fn image_dir() -> PathBuf {
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

fn port_of(vm: &VirtualMachine, name: &str) -> Option<(String, u32)> {
    vm.status
        .as_ref()?
        .ports
        .iter()
        .find(|p| p.name == name)
        .map(|p| (p.host_ip.clone(), p.host_port))
}

/// Running, its agent connected, its OS reported, and cloud-init's host name and the
/// DHCP address in place.
fn booted(vm: &VirtualMachine) -> bool {
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

async fn wait_event(s: &Stack, ns: &str, name: &str, reason: &str, needle: &str) -> Result<String> {
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let bin = std::env::current_exe()?
        .parent()
        .context("no binary directory")?
        .join("corescale-node-vmm");
    let state = s.dir.join("nodes").join(node).join("vms");
    let mut child = tokio::process::Command::new(&bin)
        .args([
            "console",
            &format!("{ns}/{NAME}"),
            "--tail",
            "0",
            "--state-dir",
        ])
        .arg(&state)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("running {}", bin.display()))?;
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
        .context("the console did not detach on Ctrl-]")??;
    let out =
        String::from_utf8_lossy(&tokio::time::timeout(Duration::from_secs(5), reader).await??)
            .into_owned();
    ensure!(status.success(), "console exited {status}: {out}");
    out.lines()
        .map(str::trim)
        .find(|l| l.ends_with("login:"))
        .map(str::to_string)
        .with_context(|| format!("no login prompt on the console: {out:?}"))
}

/// Run the scenario in namespace `ns`.
pub async fn workload(s: &Stack, ns: &str) -> Result<String> {
    let images = image_dir();
    let base = images.join("x86_64/debian/disk.qcow2");
    ensure!(
        base.is_file(),
        "{} is missing: build the Debian guest image with `make guest-disk`",
        base.display()
    );
    let base_sum = sha256(&base)?;
    // A fresh key each run, in the stack's private directory (ssh-keygen will not
    // overwrite one).
    let keydir = s.dir.join("workload-ssh");
    let _ = std::fs::remove_dir_all(&keydir);
    std::fs::create_dir_all(&keydir)?;
    let ssh = Ssh::new(&keydir).await?;
    let (vm_docs, rbac) = example(s, &ssh.public_key()?)?;

    // 1. The Secret is not readable by the node agent yet: the start is refused, saying so.
    let t0 = Instant::now();
    let (ok, _, err) = s.kubectl_with(&["apply", "-n", ns, "-f", "-"], Some(&vm_docs))?;
    ensure!(ok, "applying examples/workload.yaml: {err}");
    let denied = wait_event(s, ns, NAME, "StartFailed", "may not read Secret").await?;
    ensure!(
        denied.starts_with("spec.cloudInit.userDataSecretRef.name:"),
        "the refusal names the field: {denied}"
    );
    let (ok, _, err) = s.kubectl_with(&["apply", "-n", ns, "-f", "-"], Some(&rbac))?;
    ensure!(ok, "applying the Role: {err}");

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
    let url = format!("http://{host}:{http}/");
    let t1 = Instant::now();
    let page = loop {
        // Bounded: the forwarded port accepts before the guest's service does, and such a
        // connection can stay open with no answer.
        match tokio::time::timeout(Duration::from_secs(5), crate::http_get(&url)).await {
            Ok(Ok(b)) if b.contains("hello from a corescale VM") => break b,
            r if t1.elapsed() > BOOT => bail!("{url} never served the page: {r:?}"),
            _ => tokio::time::sleep(Duration::from_secs(2)).await,
        }
    };
    let http_s = t0.elapsed().as_secs_f64();

    // 4. SSH with the key from spec.cloudInit.sshAuthorizedKeys.
    let login = ssh.wait(&host, ssh_port, BOOT).await?;
    ensure!(login.trim() == "1", "nproc at 1 vCPU: {login}");

    // 5. The serial console, through `corescale-node-vmm console`: a getty answers.
    let console = console_login_prompt(s, &node, ns).await?;

    // 6. A CPU-bound job spreads over the vCPUs as the VM grows 1 -> 4.
    ssh.run(&host, ssh_port, "for i in 1 2 3 4; do nohup timeout 600 sh -c 'while :; do :; done' </dev/null >/dev/null 2>&1 & done; echo started").await?;
    let one = busy_cores(&ssh, &host, ssh_port, WINDOW).await?;
    s.scale(ns, NAME, 4).await?;
    s.wait_online(ns, NAME, 4, CONVERGE).await?;
    let four = busy_cores(&ssh, &host, ssh_port, WINDOW).await?;
    let _ = ssh.run(&host, ssh_port, "pkill -x timeout; true").await;
    let total = |v: &[f64]| v.iter().sum::<f64>();
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
        total(&four) >= 1.2 * total(&one),
        "more vCPUs do more work: {:.2} busy cores at 1 vCPU, {:.2} at 4",
        total(&one),
        total(&four)
    );

    // 7. Data on the root and the data disk survives an agent restart...
    let mark = format!("corescale-{}", std::process::id());
    ssh.run(
        &host,
        ssh_port,
        &format!("echo {mark} | sudo tee /var/tmp/mark >/dev/null && printf {mark} | sudo dd of=/dev/disk/by-id/virtio-data conv=fsync status=none && sync && echo ok"),
    )
    .await?;
    let read = format!(
        "sudo cat /var/tmp/mark; sudo head -c {} /dev/disk/by-id/virtio-data; echo",
        mark.len()
    );
    let want = format!("{mark}\n{mark}");
    s.stack(&["agent", "kill", &node])?;
    s.stack(&["agent", "start", &node])?;
    s.wait_online(ns, NAME, 4, CONVERGE).await?;
    ensure!(
        s.qemu(&node, ns, NAME) == Some(qemu),
        "the agent restart restarted the guest"
    );
    let got = ssh.run(&host, ssh_port, &read).await?;
    ensure!(
        got.trim() == want,
        "after the agent restart the disks hold {got:?}, not {want:?}"
    );

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
    let got = ssh.run(&host, ssh_port, &read).await?;
    ensure!(
        got.trim() == want,
        "after the reboot the disks hold {got:?}, not {want:?}"
    );
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
    ensure!(
        sha256(&base)? == base_sum,
        "the base image {} changed",
        base.display()
    );
    let _ = s.kubectl_with(
        &["delete", "-n", ns, "-f", "-", "--ignore-not-found"],
        Some(&rbac),
    );
    ensure!(page.contains("hello"), "{page}");
    Ok(format!(
        "Debian booted from its disk in {boot_s:.0} s (HTTP at {http_s:.0} s), ssh and console ({console}) ok; job {:.2} -> {:.2} busy cores at 1 -> 4 vCPUs; disks kept across agent restart and reboot; base image unchanged",
        total(&one),
        total(&four)
    ))
}
