//! `corescale-bench autoscale [STEPS]`: the reaction time of the autoscaling loop (KEDA +
//! the HPA + Prometheus + corescale) to steps of guest load, split into its parts.
//!
//! Each step starts one busy loop in the guest (1 -> 2 vCPUs), then stops it (2 -> 1). For
//! both directions it times, from the load change: when the recorded busy cores crossed
//! what the HPA acts on (the rate window and Prometheus' intervals), when `spec.cpus` was
//! written (then the HPA's sync period, KEDA's query and, down, the stabilization window),
//! and when the guest had the vCPUs online or gone (corescale's own share).

use crate::autoscale::{setup, start_loop, teardown, Sample, HPA_SYNC_SECONDS, TARGET};
use crate::procs::median;
use crate::Stack;
use anyhow::Result;
use std::time::Duration;

/// One direction of one step, seconds from the load change.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Reaction {
    /// The busy cores crossed the HPA's threshold (with its 10 % tolerance).
    pub crossed: f64,
    /// `spec.cpus` written.
    pub written: f64,
    /// The guest has the vCPUs (online or gone).
    pub done: f64,
}

/// When (seconds after `from`) the first sample after `from` satisfied `pred`.
fn first_after(samples: &[Sample], from: f64, pred: impl Fn(&Sample) -> bool) -> f64 {
    samples
        .iter()
        .find(|x| x.t >= from && pred(x))
        .map_or(f64::NAN, |x| x.t - from)
}

/// Run `steps` load steps on the stack and print the figures; returns them as JSON.
pub async fn bench(s: &Stack, ns: &str, steps: usize) -> Result<serde_json::Value> {
    s.namespace(ns)?;
    let (mut run, mut console, hpa_ready) =
        setup(s, ns, &|node| crate::autoscale::stack_state_dir(s, node)).await?;
    let (mut ups, mut downs) = (Vec::new(), Vec::new());
    for step in 1..=steps {
        let pid = start_loop(&mut console).await?;
        let t_load = run.sample().await?.t;
        run.loops = 1;
        let what = format!("step {step}: load on");
        run.until(&what, Duration::from_secs(300), |x| {
            x.desired >= 2 && x.online >= 2
        })
        .await?;
        let up = Reaction {
            // From 1 vCPU the HPA grows when busy > TARGET * 1 * 1.1.
            crossed: first_after(&run.samples, t_load, |x| x.busy > TARGET * 1.1),
            written: first_after(&run.samples, t_load, |x| x.desired >= 2),
            done: first_after(&run.samples, t_load, |x| x.online >= 2),
        };
        // Let the rate window fill, so the next drop starts from a steady load.
        run.until(&what, Duration::from_secs(40), |_| false)
            .await
            .ok();
        console
            .run(&format!("kill {pid}"), Duration::from_secs(20))
            .await?;
        let t_stop = run.sample().await?.t;
        run.loops = 0;
        let what = format!("step {step}: load off");
        run.until(&what, Duration::from_secs(300), |x| {
            x.desired == 1 && x.online == 1
        })
        .await?;
        let down = Reaction {
            // At 2 vCPUs the HPA recommends 1 once busy <= TARGET (ceil(busy / TARGET) = 1).
            crossed: first_after(&run.samples, t_stop, |x| x.busy <= TARGET),
            written: first_after(&run.samples, t_stop, |x| x.desired == 1),
            done: first_after(&run.samples, t_stop, |x| x.online == 1),
        };
        println!(
            "step {step}: up   crossed {:5.1} s  written {:5.1} s  online {:5.1} s\n\
             step {step}: down crossed {:5.1} s  written {:5.1} s  gone   {:5.1} s",
            up.crossed, up.written, up.done, down.crossed, down.written, down.done
        );
        ups.push(up);
        downs.push(down);
    }
    teardown(s, ns).await?;
    let med = |v: &[Reaction], f: fn(&Reaction) -> f64| median(v.iter().map(f).collect());
    let row = |name: &str, v: &[Reaction]| {
        let (c, w, d) = (
            med(v, |r| r.crossed),
            med(v, |r| r.written),
            med(v, |r| r.done),
        );
        println!(
            "{name:<5} median of {}: threshold crossed {c:5.1} s | + HPA/KEDA {:5.1} s -> spec.cpus written {w:5.1} s | + corescale {:4.1} s -> guest done {d:5.1} s",
            v.len(),
            w - c,
            d - w
        );
        serde_json::json!({"crossed_seconds": c, "written_seconds": w, "done_seconds": d,
            "hpa_keda_seconds": w - c, "corescale_seconds": d - w})
    };
    println!(
        "autoscale loop, {} steps of one busy loop (target {TARGET} busy cores per vCPU, HPA sync {HPA_SYNC_SECONDS} s, rate window 1m, scale-down stabilization {} s; KEDA's HPA active {hpa_ready:.0} s after the ScaledObject):",
        steps,
        crate::autoscale::STABILIZATION_SECONDS
    );
    let up = row("up", &ups);
    let down = row("down", &downs);
    Ok(
        serde_json::json!({"steps": steps, "up": up, "down": down, "raw_up": ups, "raw_down": downs,
        "hpa_sync_seconds": HPA_SYNC_SECONDS, "target": TARGET}),
    )
}
