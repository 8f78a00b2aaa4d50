//! The real-node scenarios (`corescale_e2e::node`), run by e2e/node/e2e.sh after it has
//! brought up a kubelet node and run `helm install --wait` of the chart. Each scenario is an
//! assertion and starts from where the previous one ended, so the first failure stops the
//! run (the rest would only fail for its reason). Ends with a summary table.
//!
//! Usage: corescale-node-e2e [--only NAME[,NAME]]   (env: CORESCALE_STACK_DIR,
//!        CORESCALE_HELM, CORESCALE_OPERATOR_IMAGE, CORESCALE_NODE_VMM_IMAGE; see
//!        e2e/node/e2e.sh). `--only` runs those scenarios in registry order; each starts
//!        from where the one before it ended, so keep what it needs (`scale` first).

use anyhow::Result;
use corescale_e2e::node::{Ctx, SCENARIOS};
use std::time::Instant;

#[tokio::main]
async fn main() -> Result<()> {
    let only: Option<Vec<String>> = std::env::args()
        .skip_while(|a| a != "--only")
        .nth(1)
        .map(|s| s.split(',').map(str::to_string).collect());
    let names: Vec<&str> = SCENARIOS.iter().map(|s| s.name).collect();
    if let Some(only) = &only {
        let bad: Vec<&String> = only
            .iter()
            .filter(|n| !names.contains(&n.as_str()))
            .collect();
        anyhow::ensure!(
            bad.is_empty(),
            "--only names no scenario called {bad:?}; the scenarios are {names:?}"
        );
    }
    let ctx = Ctx::from_env().await?;
    let mut rows = Vec::new();
    let mut failed = false;
    for sc in SCENARIOS {
        if only
            .as_ref()
            .is_some_and(|o| !o.iter().any(|n| n == sc.name))
        {
            rows.push((sc.name, "SKIP", 0.0, "not in --only".to_string()));
            continue;
        }
        if failed {
            rows.push((
                sc.name,
                "SKIP",
                0.0,
                "an earlier scenario failed".to_string(),
            ));
            continue;
        }
        println!("=== {}: {}", sc.name, sc.what);
        let t0 = Instant::now();
        let r = (sc.run)(&ctx).await;
        let secs = t0.elapsed().as_secs_f64();
        let (result, detail) = match r {
            Ok(d) => ("PASS", d),
            Err(e) => {
                failed = true;
                ("FAIL", format!("{e:#}"))
            }
        };
        println!("--- {result} {} ({secs:.1} s): {detail}", sc.name);
        rows.push((sc.name, result, secs, detail));
    }
    println!(
        "\n{:<20} {:<6} {:>8}  detail",
        "node scenario", "result", "seconds"
    );
    for (name, result, secs, detail) in &rows {
        let d: String = detail.chars().take(110).collect();
        println!("{name:<20} {result:<6} {secs:>8.1}  {d}");
    }
    let passed = rows.iter().filter(|r| r.1 == "PASS").count();
    let ran = rows.iter().filter(|r| r.3 != "not in --only").count();
    println!("\nnode-e2e: {passed} of {ran} passed");
    if passed != ran {
        std::process::exit(1);
    }
    Ok(())
}
