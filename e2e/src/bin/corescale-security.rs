//! corescale's security checks (issue 8, part 6), against the stack `e2e/stack.sh up` started.
//!
//! Each check is an assertion that fails if the behaviour regresses:
//! * the node agent's and the operator's service-account tokens (the kubeconfigs the stack
//!   writes, bound to the chart's RBAC) get 403 on what the chart does not grant them;
//! * a token bound to node-a (TokenRequest with a Node bound object) cannot write node-b's
//!   announcement Lease (the chart's ValidatingAdmissionPolicy), but can write node-a's;
//! * every per-VM file and socket under `nodes/*/vms/` is 0600 (directories 0700) and owned
//!   by the user running the stack;
//! * no log under the stack's directory and no /metrics body contains a token;
//! * a manifest naming a kernel outside the image directory is refused by the API server, and
//!   a kernel that is a symlink out of the image directory is refused by the node itself.
//!
//! Prints a table and `security: N passed, M failed`; exits 1 on a failure.

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use corescale_api::VirtualMachine;
use corescale_e2e::{http_get, Stack};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Secret, ServiceAccount};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const NS: &str = "corescale-security";
const SYSTEM_NS: &str = "corescale-system";
const NODE_SA: &str = "corescale-node-vmm";
const BOOT: Duration = Duration::from_secs(120);

struct Outcome {
    name: &'static str,
    ok: bool,
    detail: String,
}

#[tokio::main]
async fn main() -> Result<()> {
    let stack = Stack::from_env("stack").await?;
    stack.namespace(NS)?;
    let mut outcomes = Vec::new();
    let checks: &[&'static str] = &[
        "agent-rbac",
        "operator-rbac",
        "node-lease",
        "file-modes",
        "no-token-leak",
        "kernel-path-api",
        "kernel-symlink-node",
    ];
    for &name in checks {
        println!("=== {name}");
        let t0 = Instant::now();
        let r = run(&stack, name).await;
        let (ok, detail) = match r {
            Ok(d) => (true, d),
            Err(e) => (false, format!("{e:#}")),
        };
        println!(
            "--- {} {name} ({:.1} s): {detail}",
            if ok { "PASS" } else { "FAIL" },
            t0.elapsed().as_secs_f64()
        );
        outcomes.push(Outcome { name, ok, detail });
    }
    println!("\n{:<22} {:<6} detail", "check", "result");
    for o in &outcomes {
        let d: String = o.detail.chars().take(100).collect();
        println!(
            "{:<22} {:<6} {d}",
            o.name,
            if o.ok { "PASS" } else { "FAIL" }
        );
    }
    let passed = outcomes.iter().filter(|o| o.ok).count();
    let failed = outcomes.len() - passed;
    println!("\nsecurity: {passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}

async fn run(s: &Stack, name: &str) -> Result<String> {
    match name {
        "agent-rbac" => agent_rbac(s).await,
        "operator-rbac" => operator_rbac(s).await,
        "node-lease" => node_lease(s).await,
        "file-modes" => file_modes(s).await,
        "no-token-leak" => no_token_leak(s).await,
        "kernel-path-api" => kernel_path_api(s).await,
        "kernel-symlink-node" => kernel_symlink_node(s).await,
        other => bail!("unknown check {other}"),
    }
}

/// The kubeconfig files the stack wrote for the two service accounts.
fn kubeconfig_path(s: &Stack, who: &str) -> PathBuf {
    s.dir.join(format!("{who}.kubeconfig"))
}

async fn client_from_text(text: &str) -> Result<Client> {
    let kc = Kubeconfig::from_yaml(text)?;
    let cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(cfg)?)
}

async fn client_of(s: &Stack, who: &str) -> Result<Client> {
    let p = kubeconfig_path(s, who);
    let text = std::fs::read_to_string(&p)
        .with_context(|| format!("{} is missing: run e2e/stack.sh up", p.display()))?;
    client_from_text(&text).await
}

/// The bearer token in a kubeconfig the stack wrote.
fn token_of(s: &Stack, who: &str) -> Result<String> {
    let p = kubeconfig_path(s, who);
    let text = std::fs::read_to_string(&p)?;
    text.lines()
        .find_map(|l| l.trim().strip_prefix("token: "))
        .map(|t| t.trim().to_string())
        .filter(|t| t.len() > 20)
        .ok_or_else(|| anyhow!("no token in {}", p.display()))
}

/// The kube error's HTTP status, or a description of what came instead.
fn status_of<T>(r: kube::Result<T>) -> Result<u16, String> {
    match r {
        Ok(_) => Err("the request succeeded".into()),
        Err(kube::Error::Api(st)) => Ok(st.code),
        Err(e) => Err(format!("not an API error: {e}")),
    }
}

fn expect_403<T>(what: &str, r: kube::Result<T>, seen: &mut Vec<String>) -> Result<()> {
    match status_of(r) {
        Ok(403) => {
            seen.push(format!("{what}: 403"));
            Ok(())
        }
        Ok(code) => bail!("{what}: HTTP {code}, not 403"),
        Err(e) => bail!("{what}: {e}, not 403"),
    }
}

/// A VM used as the object of the RBAC checks, halted so it costs no guest.
async fn target_vm(s: &Stack) -> Result<()> {
    let yaml = "apiVersion: corescale.dev/v1alpha1\nkind: VirtualMachine\nmetadata:\n  name: rbac-target\nspec:\n  cpus: 1\n  runStrategy: Halted\n";
    if s.vms(NS).get_opt("rbac-target").await?.is_none() {
        s.create(NS, yaml).await?;
    }
    Ok(())
}

/// A Secret the agent and operator must not read.
async fn target_secret(s: &Stack) -> Result<()> {
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), NS);
    if secrets.get_opt("not-for-corescale").await?.is_none() {
        let sec: Secret = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "not-for-corescale"},
            "stringData": {"password": "hunter2"}
        }))?;
        secrets.create(&PostParams::default(), &sec).await?;
    }
    Ok(())
}

async fn secrets_forbidden(c: &Client, who: &str, seen: &mut Vec<String>) -> Result<()> {
    let in_ns: Api<Secret> = Api::namespaced(c.clone(), NS);
    expect_403(
        &format!("{who} get secret"),
        in_ns.get("not-for-corescale").await,
        seen,
    )?;
    expect_403(
        &format!("{who} list secrets"),
        in_ns.list(&ListParams::default()).await,
        seen,
    )?;
    let own: Api<Secret> = Api::namespaced(c.clone(), SYSTEM_NS);
    expect_403(
        &format!("{who} list secrets in {SYSTEM_NS}"),
        own.list(&ListParams::default()).await,
        seen,
    )?;
    let all: Api<Secret> = Api::all(c.clone());
    expect_403(
        &format!("{who} list secrets cluster-wide"),
        all.list(&ListParams::default()).await,
        seen,
    )?;
    Ok(())
}

/// The node agent's token: no spec writes, no deletes, no Secrets.
async fn agent_rbac(s: &Stack) -> Result<String> {
    target_vm(s).await?;
    target_secret(s).await?;
    let c = client_of(s, "node-vmm").await?;
    let vms: Api<VirtualMachine> = Api::namespaced(c.clone(), NS);
    let mut seen = Vec::new();
    // It can read VMs (what it needs), so the 403s below are about the verbs, not the token.
    vms.get("rbac-target")
        .await
        .context("the agent's token cannot even read a VM: the checks below would prove nothing")?;
    expect_403(
        "agent merge-patch spec.cpus",
        vms.patch(
            "rbac-target",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"cpus": 2}})),
        )
        .await,
        &mut seen,
    )?;
    expect_403(
        "agent apply spec",
        vms.patch(
            "rbac-target",
            &PatchParams::apply("node-vmm").force(),
            &Patch::Apply(serde_json::json!({
                "apiVersion": "corescale.dev/v1alpha1", "kind": "VirtualMachine",
                "metadata": {"name": "rbac-target"}, "spec": {"cpus": 2}
            })),
        )
        .await,
        &mut seen,
    )?;
    expect_403(
        "agent scale",
        vms.patch_scale(
            "rbac-target",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"replicas": 2}})),
        )
        .await,
        &mut seen,
    )?;
    expect_403(
        "agent delete VM",
        vms.delete("rbac-target", &DeleteParams::default()).await,
        &mut seen,
    )?;
    let vm: VirtualMachine = serde_yaml::from_str(
        "apiVersion: corescale.dev/v1alpha1\nkind: VirtualMachine\nmetadata:\n  name: made-by-agent\nspec:\n  cpus: 1\n",
    )?;
    expect_403(
        "agent create VM",
        vms.create(&PostParams::default(), &vm).await,
        &mut seen,
    )?;
    secrets_forbidden(&c, "agent", &mut seen).await?;
    let nodes: Api<Node> = Api::all(c.clone());
    expect_403(
        "agent patch Node",
        nodes
            .patch(
                "node-a",
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"metadata": {"labels": {"x": "y"}}})),
            )
            .await,
        &mut seen,
    )?;
    let leases: Api<Lease> = Api::namespaced(c.clone(), SYSTEM_NS);
    expect_403(
        "agent delete Lease",
        leases
            .delete("corescale-node-node-b", &DeleteParams::default())
            .await,
        &mut seen,
    )?;
    let vm = s.vms(NS).get("rbac-target").await?;
    ensure!(vm.spec.cpus == 1, "spec.cpus changed to {}", vm.spec.cpus);
    Ok(format!("{} refused: {}", seen.len(), seen.join(", ")))
}

/// The operator's token: no Secrets, no status of other kinds it does not own.
async fn operator_rbac(s: &Stack) -> Result<String> {
    target_secret(s).await?;
    let c = client_of(s, "operator").await?;
    let mut seen = Vec::new();
    let vms: Api<VirtualMachine> = Api::all(c.clone());
    vms.list(&ListParams::default().limit(1))
        .await
        .context("the operator's token cannot list VMs: the checks below would prove nothing")?;
    secrets_forbidden(&c, "operator", &mut seen).await?;
    let nodes: Api<Node> = Api::all(c.clone());
    expect_403(
        "operator delete Node",
        nodes.delete("node-b", &DeleteParams::default()).await,
        &mut seen,
    )?;
    Ok(format!("{} refused: {}", seen.len(), seen.join(", ")))
}

/// A token of the agents' service account bound to a Node object, as the kubelet gives a
/// DaemonSet pod on that node: it may write its own node's Lease but not another's.
async fn node_bound_client(s: &Stack, node: &str) -> Result<(Client, String)> {
    let nodes: Api<Node> = Api::all(s.client.clone());
    let n = nodes.get(node).await?;
    let sas: Api<ServiceAccount> = Api::namespaced(s.client.clone(), SYSTEM_NS);
    let tr = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![],
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(node.into()),
                uid: n.metadata.uid.clone(),
            }),
            expiration_seconds: Some(600),
        },
        ..TokenRequest::default()
    };
    let tr = sas
        .create_token_request(NODE_SA, &PostParams::default(), &tr)
        .await
        .context("TokenRequest bound to a Node")?;
    let token = tr.status.context("no token in the TokenRequest")?.token;
    let text = std::fs::read_to_string(kubeconfig_path(s, "node-vmm"))?;
    let old = token_of(s, "node-vmm")?;
    ensure!(text.contains(&old), "token not found in the kubeconfig");
    Ok((client_from_text(&text.replace(&old, &token)).await?, token))
}

/// An update of `name` through `leases` with `params` (a dry run), from a copy read just
/// before. The agents renew their Leases every few seconds: a renewal in between makes the
/// update a 409 before admission is asked, so that case is retried on a fresh copy.
async fn update_lease(
    admin: &Api<Lease>,
    leases: &Api<Lease>,
    name: &str,
    params: &PostParams,
) -> kube::Result<Lease> {
    let mut tries = 0;
    loop {
        let current = admin.get(name).await?;
        match leases.replace(name, params, &current).await {
            Err(kube::Error::Api(st)) if st.code == 409 && tries < 5 => tries += 1,
            r => return r,
        }
    }
}

async fn node_lease(s: &Stack) -> Result<String> {
    let leases_admin: Api<Lease> = Api::namespaced(s.client.clone(), SYSTEM_NS);
    let (c, _) = node_bound_client(s, "node-a").await?;
    let leases: Api<Lease> = Api::namespaced(c, SYSTEM_NS);
    // Dry runs: admission decides, nothing is stored, the real agents are not disturbed.
    let dry = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    update_lease(&leases_admin, &leases, "corescale-node-node-a", &dry)
        .await
        .context("node-a's token may not update node-a's own Lease")?;
    let mut seen = vec!["node-a token updates node-a's Lease: allowed".to_string()];
    let r = update_lease(&leases_admin, &leases, "corescale-node-node-b", &dry).await;
    let msg = match &r {
        Err(kube::Error::Api(st)) => st.message.clone(),
        _ => String::new(),
    };
    expect_403("node-a token updates node-b's Lease", r, &mut seen)?;
    ensure!(
        msg.contains("may write only its own Lease"),
        "the 403 is not the chart's policy: {msg}"
    );
    let mut fresh: Lease = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "corescale-node-node-z", "namespace": SYSTEM_NS}
    }))?;
    fresh.metadata.namespace = Some(SYSTEM_NS.into());
    expect_403(
        "node-a token creates node-z's Lease",
        leases.create(&dry, &fresh).await,
        &mut seen,
    )?;
    Ok(seen.join(", "))
}

/// The uid this process runs as (the owner of /proc/self).
fn my_uid() -> Result<u32> {
    Ok(std::fs::metadata("/proc/self")?.uid())
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        let md = std::fs::symlink_metadata(&p)?;
        out.push(p.clone());
        if md.is_dir() {
            walk(&p, out)?;
        }
    }
    Ok(())
}

/// Boot one guest (so its sockets exist), then check every path under nodes/*/vms/.
async fn file_modes(s: &Stack) -> Result<String> {
    let yaml = "apiVersion: corescale.dev/v1alpha1\nkind: VirtualMachine\nmetadata:\n  name: files\nspec:\n  cpus: 1\n  topology: {sockets: 1, cores: 2, threads: 1}\n";
    if s.vms(NS).get_opt("files").await?.is_none() {
        s.create(NS, yaml).await?;
    }
    s.wait_online(NS, "files", 1, BOOT).await?;
    let uid = my_uid()?;
    let mut paths = Vec::new();
    for node in std::fs::read_dir(s.dir.join("nodes"))? {
        let vms = node?.path().join("vms");
        if vms.is_dir() {
            paths.push(vms.clone());
            walk(&vms, &mut paths)?;
        }
    }
    let (mut sockets, mut files, mut dirs) = (0, 0, 0);
    let mut bad = Vec::new();
    for p in &paths {
        let md = std::fs::symlink_metadata(p)?;
        let mode = md.mode() & 0o7777;
        let ft = md.file_type();
        let want = if ft.is_dir() {
            dirs += 1;
            0o700
        } else {
            if ft.is_socket() {
                sockets += 1;
            } else {
                files += 1;
            }
            0o600
        };
        if mode != want || md.uid() != uid || ft.is_symlink() {
            bad.push(format!(
                "{} mode {mode:o} uid {} (want {want:o}, uid {uid})",
                p.display(),
                md.uid()
            ));
        }
    }
    ensure!(bad.is_empty(), "{}", bad.join("; "));
    ensure!(
        sockets >= 2,
        "only {sockets} sockets found: the running guest's QMP/QGA sockets are missing"
    );
    s.delete(NS, "files").await?;
    s.wait_gone(NS, "files", Duration::from_secs(60)).await?;
    Ok(format!(
        "{sockets} sockets and {files} files 0600, {dirs} directories 0700, all uid {uid}"
    ))
}

/// No token in any log of the stack nor in any /metrics body.
async fn no_token_leak(s: &Stack) -> Result<String> {
    let tokens = [token_of(s, "node-vmm")?, token_of(s, "operator")?];
    // The whole token, and its signature alone (a log that cut the token would still leak it).
    let needles: Vec<&str> = tokens
        .iter()
        .flat_map(|t| [t.as_str(), t.rsplit('.').next().unwrap_or(t)])
        .filter(|n| n.len() >= 20)
        .collect();
    let mut logs = Vec::new();
    let mut all = Vec::new();
    walk(&s.dir, &mut all)?;
    for p in all {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.ends_with(".log") && p.is_file() {
            logs.push(p);
        }
    }
    ensure!(
        logs.iter().any(|p| p.ends_with("operator.log"))
            && logs.iter().any(|p| p.ends_with("agent.log")),
        "the operator's and agents' logs were not found under {}",
        s.dir.display()
    );
    let mut bytes = 0usize;
    for p in &logs {
        let text = String::from_utf8_lossy(&std::fs::read(p)?).into_owned();
        bytes += text.len();
        for n in &needles {
            ensure!(
                !text.contains(n),
                "{} contains a service-account token",
                p.display()
            );
        }
    }
    let mut bodies = 0;
    for var in [
        "CORESCALE_OPERATOR_METRICS",
        "CORESCALE_NODE_A_METRICS",
        "CORESCALE_NODE_B_METRICS",
    ] {
        let url = format!("{}/metrics", s.var(var)?);
        let body = http_get(&url).await?;
        ensure!(body.contains("corescale_"), "{url}: no corescale metrics");
        for n in &needles {
            ensure!(!body.contains(n), "{url} contains a service-account token");
        }
        bodies += 1;
    }
    Ok(format!(
        "{} logs ({} KiB) and {bodies} /metrics bodies hold neither token",
        logs.len(),
        bytes / 1024
    ))
}

/// The API server refuses kernels outside the image directory (CEL rules on the CRD).
async fn kernel_path_api(s: &Stack) -> Result<String> {
    let mut seen = Vec::new();
    for (name, kernel) in [
        ("kernel-shadow", "/etc/shadow"),
        ("kernel-dotdot", "../../etc/passwd"),
        ("kernel-inner-dotdot", "vmlinux/../../../etc/passwd"),
    ] {
        let yaml = format!(
            "apiVersion: corescale.dev/v1alpha1\nkind: VirtualMachine\nmetadata:\n  name: {name}\nspec:\n  cpus: 1\n  boot: {{kernel: \"{kernel}\"}}\n"
        );
        match s.create(NS, &yaml).await {
            Ok(_) => {
                let _ = s.delete(NS, name).await;
                bail!("the API server accepted spec.boot.kernel {kernel}");
            }
            Err(e) => {
                let msg = format!("{e:#}");
                ensure!(
                    msg.contains("spec.boot.kernel"),
                    "{kernel}: refused, but the error does not name spec.boot.kernel: {msg}"
                );
                seen.push(kernel);
            }
        }
    }
    Ok(format!("refused: {}", seen.join(", ")))
}

/// Removes the symlink it names when dropped, whatever happened.
struct TempLink(PathBuf);

impl Drop for TempLink {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The node's own check: a kernel that is a symlink in the image directory pointing outside
/// it passes the API server (the name is relative) and must be refused by the node.
async fn kernel_symlink_node(s: &Stack) -> Result<String> {
    let cache = std::env::var_os("CORESCALE_CACHE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/corescale")
        });
    let images = cache.join("guest/x86_64");
    ensure!(
        images.join("vmlinux").is_file(),
        "no guest image in {}: run node-vmm/guest/build.sh",
        images.display()
    );
    let link_name = format!(
        "security-escape-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis()
    );
    let link = TempLink(images.join(&link_name));
    std::os::unix::fs::symlink("/etc/passwd", &link.0)
        .with_context(|| format!("creating {}", link.0.display()))?;
    let name = "kernel-symlink";
    let yaml = format!(
        "apiVersion: corescale.dev/v1alpha1\nkind: VirtualMachine\nmetadata:\n  name: {name}\nspec:\n  cpus: 1\n  boot: {{kernel: \"x86_64/{link_name}\"}}\n"
    );
    let _ = s.delete(NS, name).await;
    let _ = s.wait_gone(NS, name, Duration::from_secs(60)).await;
    s.create(NS, &yaml)
        .await
        .context("the API server refused a relative kernel path")?;
    let result = async {
        let t0 = Instant::now();
        loop {
            let vm = s.vms(NS).get(name).await?;
            let status = serde_json::to_string(&vm.status)?;
            let events = s.events(NS, name)?;
            // The node's own words: the field, and that the file leads outside the directory
            // (not merely "not found" or "not a kernel").
            let refused = |t: &str| t.contains("spec.boot.kernel") && t.contains("outside");
            let in_events = events.iter().any(|(_, n)| refused(n));
            if refused(&status) || in_events {
                ensure!(
                    s.qemu_processes(NS, name).is_empty(),
                    "a QEMU runs for {name} although its kernel was refused"
                );
                let where_ = if in_events { "an Event" } else { "its status" };
                return Ok(format!(
                    "refused by the node (spec.boot.kernel in {where_}) after {:.1} s; no QEMU",
                    t0.elapsed().as_secs_f64()
                ));
            }
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("no spec.boot.kernel error saying the symlink leads outside after 60 s; status {status}; events {events:?}");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    .await;
    let _ = s.delete(NS, name).await;
    let _ = s.wait_gone(NS, name, Duration::from_secs(60)).await;
    drop(link);
    result
}
