//! The e2e scenarios, run against the stack that `e2e/stack.sh up` started. Each scenario
//! is an assertion; the run ends with a summary table and `N passed, M failed`. Fault
//! scenarios also report their figures (faults injected, recoveries, seconds to recover)
//! in a second table and in `$CORESCALE_STACK_DIR/e2e-faults.json`. The scenarios and their
//! registry live in the library, `corescale_e2e::scenarios`.
//!
//! Usage: corescale-e2e [--only NAME[,NAME]]   (CORESCALE_STACK_DIR selects the stack)

use anyhow::{Context as _, Result};
use corescale_e2e::scenarios::{self, Faults, Group, NS};
use corescale_e2e::Stack;
use std::time::Instant;

struct Outcome {
    name: &'static str,
    group: Group,
    ok: bool,
    seconds: f64,
    detail: String,
    faults: Faults,
}

#[tokio::main]
async fn main() -> Result<()> {
    let only: Option<Vec<String>> = std::env::args()
        .skip_while(|a| a != "--only")
        .nth(1)
        .map(|s| s.split(',').map(str::to_string).collect());
    if let Some(names) = &only {
        let bad = scenarios::unknown(names);
        anyhow::ensure!(
            bad.is_empty(),
            "--only names no scenario called {bad:?}; the scenarios are {:?}",
            scenarios::SCENARIOS
                .iter()
                .map(|s| s.name)
                .collect::<Vec<_>>()
        );
    }
    let stack = Stack::from_env("stack").await?;
    stack.namespace(NS)?;
    let mut outcomes = Vec::new();
    for sc in scenarios::selected(only.as_deref()) {
        let name = sc.name;
        println!("=== {name}: {}", sc.what);
        let t0 = Instant::now();
        let mut faults = Faults::default();
        let r = (sc.run)(&stack, &mut faults).await;
        let seconds = t0.elapsed().as_secs_f64();
        let (ok, detail) = match r {
            Ok(d) => (true, d),
            Err(e) => (false, format!("{e:#}")),
        };
        println!(
            "--- {} {name} ({seconds:.1} s): {detail}",
            if ok { "PASS" } else { "FAIL" }
        );
        outcomes.push(Outcome {
            name,
            group: sc.group,
            ok,
            seconds,
            detail,
            faults,
        });
    }
    println!(
        "\n{:<22} {:<6} {:>8}  detail",
        "scenario", "result", "seconds"
    );
    for o in &outcomes {
        let d: String = o.detail.chars().take(90).collect();
        println!(
            "{:<22} {:<6} {:>8.1}  {d}",
            o.name,
            if o.ok { "PASS" } else { "FAIL" },
            o.seconds
        );
    }
    fault_summary(&stack, &outcomes)?;
    let passed = outcomes.iter().filter(|o| o.ok).count();
    let failed = outcomes.len() - passed;
    println!("\ne2e: {passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}

/// Print the fault figures and write them to `e2e-faults.json` in the stack's directory
/// (next to its logs).
fn fault_summary(s: &Stack, outcomes: &[Outcome]) -> Result<()> {
    let faulty: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| o.group == Group::Fault)
        .collect();
    if faulty.is_empty() {
        return Ok(());
    }
    println!(
        "\n{:<22} {:<6} {:>8} {:>10}  seconds to recover",
        "fault scenario", "result", "injected", "recoveries"
    );
    let mut rows = Vec::new();
    for o in &faulty {
        let f = &o.faults;
        let secs: Vec<String> = f.recoveries.iter().map(|x| format!("{x:.1}")).collect();
        println!(
            "{:<22} {:<6} {:>8} {:>10}  {}",
            o.name,
            if o.ok { "PASS" } else { "FAIL" },
            f.injected,
            f.recoveries.len(),
            if secs.is_empty() {
                "-".to_string()
            } else {
                secs.join(", ")
            }
        );
        rows.push(serde_json::json!({
            "scenario": o.name,
            "passed": o.ok,
            "faults_injected": f.injected,
            "recoveries": f.recoveries.len(),
            "seconds_to_recover": f.recoveries,
            "max_seconds_to_recover": f.worst(),
            "scenario_seconds": o.seconds,
        }));
    }
    let injected: u32 = faulty.iter().map(|o| o.faults.injected).sum();
    let recovered: usize = faulty.iter().map(|o| o.faults.recoveries.len()).sum();
    println!("faults: {injected} injected, {recovered} recoveries");
    let doc = serde_json::json!({
        "generated": chrono::Utc::now().to_rfc3339(),
        "faults_injected": injected,
        "recoveries": recovered,
        "scenarios": rows,
    });
    let path = s.dir.join("e2e-faults.json");
    std::fs::write(&path, serde_json::to_string_pretty(&doc)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    println!("fault figures written to {}", path.display());
    Ok(())
}
