//! Scenario `metrics`: Prometheus has the documented series, the histogram counts the
//! resizes done, and every query of the chart's dashboards returns series.

use crate::{prom_value, Stack};
use anyhow::{ensure, Context as _, Result};
use std::time::Duration;

/// `metrics`: Prometheus: the documented series exist for each VM, and the latency histogram's
/// counts match the operations done on the smt VM (4 plugs, 2 unplugs of one thread each).
pub(super) async fn metrics(s: &Stack) -> Result<String> {
    let sel = r#"namespace="demo",name="smt""#;
    let want = [("plug", 4.0), ("unplug", 2.0)];
    for (dir, n) in want {
        let q = format!(
            r#"sum(corescale_vcpu_hotplug_duration_seconds_count{{{sel},direction="{dir}",phase="total"}})"#
        );
        s.wait_prom(&q, Duration::from_secs(30), |r| {
            r.len() == 1 && prom_value(&r[0]) == n
        })
        .await?;
        let q = format!(
            r#"sum(corescale_vcpu_hotplug_operations_total{{{sel},direction="{dir}",result="success"}})"#
        );
        s.wait_prom(&q, Duration::from_secs(30), |r| {
            r.len() == 1 && prom_value(&r[0]) == n
        })
        .await?;
    }
    let series = [
        "corescale_vm_vcpus{state=\"desired\"}",
        "corescale_vm_vcpus{state=\"online\"}",
        "corescale_vm_vcpus{state=\"present\"}",
        "corescale_vm_vcpus{state=\"plugging\"}",
        "corescale_vm_vcpus{state=\"unplugging\"}",
        "corescale_vm_vcpus{state=\"max\"}",
        "corescale_vcpu_hotplug_duration_seconds_bucket",
        "corescale_vcpu_hotplug_operations_total",
        "corescale_vcpu_cpu_seconds_total",
        "corescale_vm_phase",
        "corescale_resize_pending",
        "corescale_build_info",
        "corescale_operator_reconcile_duration_seconds_count",
        "corescale_operator_vms",
    ];
    for q in series {
        let per_vm = q.starts_with("corescale_vm")
            || q.starts_with("corescale_vcpu")
            || q.starts_with("corescale_resize");
        for vm in ["example", "smt"] {
            let q = if per_vm {
                let (m, rest) = q
                    .split_once('{')
                    .map(|(m, r)| (m, format!(",{r}")))
                    .unwrap_or((q, "}".into()));
                format!("{m}{{namespace=\"demo\",name=\"{vm}\"{rest}")
            } else {
                q.to_string()
            };
            s.wait_prom(&q, Duration::from_secs(20), |r| !r.is_empty())
                .await?;
        }
    }
    let r = s
        .prom(r#"corescale_vm_vcpus{namespace="demo",name="example",state="online"}"#)
        .await?;
    ensure!(
        r.len() == 1 && prom_value(&r[0]) == 4.0,
        "online gauge of example: {r:?}"
    );
    let r = s
        .prom(
            r#"sum(rate(corescale_vcpu_cpu_seconds_total{namespace="demo",name="example"}[30s]))"#,
        )
        .await?;
    ensure!(
        r.len() == 1 && prom_value(&r[0]) > 0.0,
        "vCPU CPU time of example does not move: {r:?}"
    );
    let r = s.prom("histogram_quantile(0.5, sum by (le) (rate(corescale_vcpu_hotplug_duration_seconds_bucket{phase=\"total\",direction=\"plug\"}[5m])))").await?;
    let median = r.first().map(prom_value).unwrap_or(f64::NAN);
    dashboard_queries(s).await?;
    Ok(format!("histogram counts 4 plugs / 2 unplugs as done; {} series present; plug median {median:.3} s", series.len()))
}

/// Every query of the chart's Grafana dashboard returns series now.
async fn dashboard_queries(s: &Stack) -> Result<()> {
    let path = s.repo.join("charts/corescale/files");
    let rd = std::fs::read_dir(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut n = 0;
    for f in rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
    {
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&f)?)?;
        let mut exprs = Vec::new();
        collect_exprs(&v, &mut exprs);
        for e in exprs {
            let q = e
                .replace("$namespace", "demo")
                .replace("$vm", "example")
                .replace("$__rate_interval", "1m")
                .replace("$__interval", "30s");
            s.wait_prom(&q, Duration::from_secs(20), |r| !r.is_empty())
                .await
                .with_context(|| format!("dashboard {} query {e}", f.display()))?;
            n += 1;
        }
    }
    ensure!(n > 0, "the dashboards hold no queries");
    Ok(())
}

fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            if let Some(e) = m.get("expr").and_then(|e| e.as_str()) {
                out.push(e.to_string());
            }
            for x in m.values() {
                collect_exprs(x, out);
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_exprs(x, out)),
        _ => {}
    }
}
