//! The real-node scenarios (`corescale_e2e::node`), run by e2e/node/e2e.sh after it has
//! brought up a kubelet node and run `helm install --wait` of the chart. Each scenario is an
//! assertion and starts from where the previous one ended, so the first failure stops the
//! run (the rest would only fail for its reason). Ends with a summary table.
//!
//! Usage: corescale-node-e2e   (env: CORESCALE_STACK_DIR, CORESCALE_HELM,
//!        CORESCALE_OPERATOR_IMAGE, CORESCALE_NODE_VMM_IMAGE; see e2e/node/e2e.sh)

use anyhow::Result;
use corescale_e2e::node::{Ctx, SCENARIOS};
use std::time::Instant;

#[tokio::main]
async fn main() -> Result<()> {
    let ctx = Ctx::from_env().await?;
    let mut rows = Vec::new();
    let mut failed = false;
    for sc in SCENARIOS {
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
        "\n{:<16} {:<6} {:>8}  detail",
        "node scenario", "result", "seconds"
    );
    for (name, result, secs, detail) in &rows {
        let d: String = detail.chars().take(110).collect();
        println!("{name:<16} {result:<6} {secs:>8.1}  {d}");
    }
    let passed = rows.iter().filter(|r| r.1 == "PASS").count();
    println!("\nnode-e2e: {passed} of {} passed", rows.len());
    if passed != rows.len() {
        std::process::exit(1);
    }
    Ok(())
}
