//! corescale's e2e harness: talks to the stack that `e2e/stack.sh up` started (a real
//! kube-apiserver, the operator, two node agents with their launchers and QEMU/TCG guests,
//! Prometheus) and checks what a user would see.

pub mod autoscale;
pub mod autoscale_bench;
pub mod console;
pub mod crd_cost_bench;
pub mod node;
pub mod plot;
pub mod procs;
pub mod scale_growth;
pub mod scale_watch;
pub mod scenarios;

use anyhow::{anyhow, bail, Context as _, Result};
use corescale_api::VirtualMachine;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config, ResourceExt};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The running stack, read from `$CORESCALE_STACK_DIR/env`.
pub struct Stack {
    /// The stack's directory.
    pub dir: PathBuf,
    /// The repository root.
    pub repo: PathBuf,
    /// Variables of the env file.
    pub env: HashMap<String, String>,
    /// Admin client.
    pub client: Client,
}

impl Stack {
    /// Connect to the stack in `$CORESCALE_STACK_DIR`, or `e2e/.run/<default_dir>`.
    pub async fn from_env(default_dir: &str) -> Result<Self> {
        let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .canonicalize()?;
        let dir = std::env::var_os("CORESCALE_STACK_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo.join("e2e/.run").join(default_dir));
        Self::open(&repo, &dir).await
    }

    /// Connect to the stack in `dir`.
    pub async fn open(repo: &Path, dir: &Path) -> Result<Self> {
        let mut env = HashMap::new();
        for file in [dir.join("cluster/env"), dir.join("env")] {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("{} is missing: run e2e/stack.sh up", file.display()))?;
            for line in text.lines() {
                if let Some((k, v)) = line.strip_prefix("export ").and_then(|l| l.split_once('=')) {
                    env.insert(k.to_string(), v.to_string());
                }
            }
        }
        let kubeconfig = env
            .get("KUBECONFIG")
            .ok_or_else(|| anyhow!("KUBECONFIG not in env"))?;
        let kc = Kubeconfig::read_from(kubeconfig)?;
        let cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
        let client = Client::try_from(cfg)?;
        Ok(Stack {
            dir: dir.to_path_buf(),
            repo: repo.to_path_buf(),
            env,
            client,
        })
    }

    /// A variable of the env file.
    pub fn var(&self, k: &str) -> Result<&str> {
        self.env
            .get(k)
            .map(String::as_str)
            .ok_or_else(|| anyhow!("{k} not in the stack's env"))
    }

    /// Run kubectl (the server's version) as admin; returns (success, stdout, stderr).
    pub fn kubectl(&self, args: &[&str]) -> Result<(bool, String, String)> {
        self.kubectl_with(args, None)
    }

    /// Run kubectl with optional stdin.
    pub fn kubectl_with(
        &self,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<(bool, String, String)> {
        use std::io::Write;
        let kubectl = self.var("CORESCALE_KUBECTL").unwrap_or("kubectl");
        let mut cmd = Command::new(kubectl);
        cmd.args(args).env("KUBECONFIG", self.var("KUBECONFIG")?);
        cmd.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("running {kubectl}"))?;
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .expect("piped")
                .write_all(input.as_bytes())?;
        }
        drop(child.stdin.take());
        let out = child.wait_with_output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// Run `e2e/stack.sh` with these arguments.
    pub fn stack(&self, args: &[&str]) -> Result<()> {
        let st = Command::new("bash")
            .arg(self.repo.join("e2e/stack.sh"))
            .args(args)
            .env("CORESCALE_STACK_DIR", &self.dir)
            .status()?;
        if !st.success() {
            bail!("e2e/stack.sh {} failed", args.join(" "));
        }
        Ok(())
    }

    /// VirtualMachines of a namespace.
    pub fn vms(&self, ns: &str) -> Api<VirtualMachine> {
        Api::namespaced(self.client.clone(), ns)
    }

    /// Create a namespace (ignoring "already exists").
    pub fn namespace(&self, ns: &str) -> Result<()> {
        let (_, out, _) =
            self.kubectl(&["create", "namespace", ns, "--dry-run=client", "-o", "yaml"])?;
        let (ok, _, err) = self.kubectl_with(&["apply", "-f", "-"], Some(&out))?;
        if !ok {
            bail!("creating namespace {ns}: {err}");
        }
        Ok(())
    }

    /// Create a VM from YAML (metadata.namespace is set to `ns`).
    pub async fn create(&self, ns: &str, yaml: &str) -> Result<VirtualMachine> {
        let vm: VirtualMachine = serde_yaml::from_str(yaml)?;
        Ok(self.vms(ns).create(&PostParams::default(), &vm).await?)
    }

    /// Set spec.cpus through the /scale subresource, as `kubectl scale` and autoscalers do.
    pub async fn scale(&self, ns: &str, name: &str, cpus: u32) -> Result<()> {
        let body = serde_json::json!({"spec": {"replicas": cpus}});
        self.vms(ns)
            .patch_scale(name, &PatchParams::default(), &Patch::Merge(&body))
            .await?;
        Ok(())
    }

    /// Delete a VM.
    pub async fn delete(&self, ns: &str, name: &str) -> Result<()> {
        self.vms(ns).delete(name, &DeleteParams::default()).await?;
        Ok(())
    }

    /// Poll a VM until `pred` holds; the error says what was last seen.
    pub async fn wait_vm(
        &self,
        ns: &str,
        name: &str,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&VirtualMachine) -> bool,
    ) -> Result<VirtualMachine> {
        let start = Instant::now();
        let mut last = None;
        while start.elapsed() < timeout {
            match self.vms(ns).get_opt(name).await {
                Ok(Some(vm)) => {
                    if pred(&vm) {
                        return Ok(vm);
                    }
                    last = Some(vm);
                }
                Ok(None) => last = None,
                Err(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let seen = last
            .map(|v| serde_json::to_string(&v.status).unwrap_or_default())
            .unwrap_or_else(|| "no object".into());
        bail!(
            "{ns}/{name}: not {what} after {} s; last status: {seen}",
            timeout.as_secs()
        )
    }

    /// Wait (up to 5 s) until the agent reports a slot Plugging: the middle of a resize.
    /// Returns without error if the resize was already past that point.
    pub async fn wait_plugging(&self, ns: &str, name: &str) {
        let _ = self
            .wait_vm(ns, name, "plugging", Duration::from_secs(5), |v| {
                v.status.as_ref().is_some_and(|s| {
                    s.vcpus
                        .iter()
                        .any(|c| c.state == corescale_api::VcpuState::Plugging)
                })
            })
            .await;
    }

    /// Create a one-socket VM of `cores` slots with 1 vCPU, wait until its guest runs, and
    /// return its node.
    pub async fn boot_one(&self, ns: &str, name: &str, cores: u32) -> Result<String> {
        let yaml = format!(
            "apiVersion: corescale.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: {name}}}\n\
             spec: {{cpus: 1, topology: {{sockets: 1, cores: {cores}, threads: 1}}}}\n"
        );
        self.create(ns, &yaml).await?;
        let vm = self
            .wait_online(ns, name, 1, Duration::from_secs(90))
            .await?;
        node_of(&vm).ok_or_else(|| anyhow!("{ns}/{name} has no node"))
    }

    /// Wait until the VM object is gone (its finalizer removed).
    pub async fn wait_gone(&self, ns: &str, name: &str, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        while self.vms(ns).get_opt(name).await?.is_some() {
            if start.elapsed() > timeout {
                bail!("{ns}/{name} still exists after {} s", timeout.as_secs());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }

    /// Wait until the guest runs with `cpus` vCPUs online (agent's view) and Ready.
    pub async fn wait_online(
        &self,
        ns: &str,
        name: &str,
        cpus: u32,
        timeout: Duration,
    ) -> Result<VirtualMachine> {
        self.wait_vm(
            ns,
            name,
            &format!("Ready with {cpus} vCPUs online"),
            timeout,
            |vm| {
                online(vm) == cpus
                    && vm.status.as_ref().is_some_and(|s| {
                        s.cpus == Some(cpus) && s.observed_generation == vm.metadata.generation
                    })
                    && condition(vm, "Ready").is_some_and(|c| c.status == "True")
            },
        )
        .await
    }

    /// Events of an object, oldest first, as (reason, note).
    pub fn events(&self, ns: &str, name: &str) -> Result<Vec<(String, String)>> {
        let (ok, out, err) = self.kubectl(&[
            "get",
            "events.events.k8s.io",
            "-n",
            ns,
            "-o",
            "json",
            "--field-selector",
            &format!("regarding.name={name}"),
        ])?;
        if !ok {
            bail!("listing events: {err}");
        }
        let v: Value = serde_json::from_str(&out)?;
        let mut items: Vec<&Value> = v["items"]
            .as_array()
            .map(|a| a.iter().collect())
            .unwrap_or_default();
        items.sort_by_key(|e| e["eventTime"].as_str().unwrap_or("").to_string());
        Ok(items
            .into_iter()
            .map(|e| {
                (
                    e["reason"].as_str().unwrap_or("").into(),
                    e["note"].as_str().unwrap_or("").into(),
                )
            })
            .collect())
    }

    /// The QEMU process of a VM on a node: (pid, spawn time), from the launcher's vm.json.
    pub fn qemu(&self, node: &str, ns: &str, name: &str) -> Option<(i32, u64)> {
        let p = self
            .dir
            .join("nodes")
            .join(node)
            .join("vms")
            .join(ns)
            .join(name)
            .join("vm.json");
        let v: Value = serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()?;
        let pid = i32::try_from(v["pid"].as_i64()?).ok()?;
        let alive = std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
            !s.lines()
                .any(|l| l.starts_with("State:") && l.contains('Z'))
        });
        alive.then(|| (pid, v["started_unix_ms"].as_u64().unwrap_or(0)))
    }

    /// QEMU processes whose command line mentions this VM's state directory.
    pub fn qemu_processes(&self, ns: &str, name: &str) -> Vec<i32> {
        let needle = format!("/vms/{ns}/{name}/");
        let dir = self.dir.to_string_lossy();
        procs::qemu_pids(&[&needle, dir.as_ref()])
            .into_iter()
            .map(|(pid, _)| pid)
            .collect()
    }

    /// Run a PromQL instant query; returns the result vector.
    pub async fn prom(&self, query: &str) -> Result<Vec<Value>> {
        let base = self.var("CORESCALE_PROMETHEUS")?;
        let body = http_get(&format!("{base}/api/v1/query?query={}", urlencode(query))).await?;
        let v: Value =
            serde_json::from_str(&body).with_context(|| format!("prometheus said: {body}"))?;
        if v["status"] != "success" {
            bail!("query {query}: {body}");
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// Wait until a PromQL query satisfies `pred` (Prometheus scrapes every 2 s).
    pub async fn wait_prom(
        &self,
        query: &str,
        timeout: Duration,
        pred: impl Fn(&[Value]) -> bool,
    ) -> Result<Vec<Value>> {
        let start = Instant::now();
        let mut last = Vec::new();
        while start.elapsed() < timeout {
            if let Ok(r) = self.prom(query).await {
                if pred(&r) {
                    return Ok(r);
                }
                last = r;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        bail!(
            "prometheus query {query} did not match within {} s; last: {last:?}",
            timeout.as_secs()
        )
    }
}

/// vCPUs Online in status.vcpus.
pub fn online(vm: &VirtualMachine) -> u32 {
    vm.status
        .as_ref()
        .map(|s| {
            s.vcpus
                .iter()
                .filter(|v| v.state == corescale_api::VcpuState::Online)
                .count()
        })
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(0)
}

/// A condition of the VM.
pub fn condition<'a>(
    vm: &'a VirtualMachine,
    t: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    vm.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == t))
}

/// Node of the VM.
pub fn node_of(vm: &VirtualMachine) -> Option<String> {
    vm.status.as_ref().and_then(|s| s.node_name.clone())
}

/// The value of a one-sample PromQL result.
pub fn prom_value(v: &Value) -> f64 {
    v["value"][1]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(f64::NAN)
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A plain HTTP/1.1 GET on loopback.
pub async fn http_get(url: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("only http:// URLs: {url}"))?;
    let (host, path) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    let mut s = tokio::net::TcpStream::connect(host)
        .await
        .with_context(|| format!("connecting to {host}"))?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("bad HTTP reply from {url}"))?;
    // The status code, whatever the version (Python's http.server answers HTTP/1.0).
    if head.split_whitespace().nth(1) != Some("200") {
        bail!("GET {url}: {}", head.lines().next().unwrap_or(""));
    }
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Ok(dechunk(body));
    }
    Ok(body.to_string())
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

/// Name of the VM and its namespace, for messages.
pub fn id(vm: &VirtualMachine) -> String {
    format!("{}/{}", vm.namespace().unwrap_or_default(), vm.name_any())
}

/// The machine a benchmark ran on: CPUs, model, memory.
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map(|kib| format!(", {:.0} GiB", kib / 1024.0 / 1024.0))
        .unwrap_or_default();
    format!("{cpus} CPUs, {model}{mem}")
}

/// Register the font the benchmark plots use as "sans-serif" (plotters draws text from a
/// TTF file; no system font lookup).
pub fn register_plot_font() -> Result<()> {
    const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
    let font = std::fs::read(FONT)
        .with_context(|| format!("{FONT} is missing: apt-get install fonts-dejavu-core"))?;
    plotters::style::register_font(
        "sans-serif",
        plotters::style::FontStyle::Normal,
        Box::leak(font.into()),
    )
    .map_err(|_| anyhow!("{FONT} is not a usable font"))
}
