//! How the scale benchmark's figures grow with the number of VMs (`corescale-scale growth`
//! and `plot`): the result files of one run, grouped by size; a size run more than once
//! (`REPEAT` in e2e/scale.sh) counts by the median of its runs, figure by figure, so one
//! slow run of the small baseline does not set every ratio.

use anyhow::{bail, Context as _, Result};
use plotters::prelude::*;
use serde_json::Value;
use std::path::Path;

/// The runs of one size.
pub struct Size {
    pub vms: f64,
    /// VMs already in the store, halted, while these ran (`IDLE`).
    pub idle: f64,
    pub runs: Vec<Value>,
}

impl Size {
    /// The median over the runs of the figure at `path` (NaN when no run has it).
    pub fn median(&self, path: &[&str]) -> f64 {
        crate::procs::median(
            self.runs
                .iter()
                .map(|r| figure(r, path))
                .filter(|x| x.is_finite())
                .collect(),
        )
    }

    /// The range over the runs of the figure at `path`, as "lo-hi" (or the one value).
    fn spread(&self, path: &[&str], digits: usize) -> String {
        let v: Vec<f64> = self.runs.iter().map(|r| figure(r, path)).collect();
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if self.runs.len() < 2 {
            format!("{lo:.digits$}")
        } else {
            format!("{lo:.digits$}-{hi:.digits$}")
        }
    }

    /// corescale's own CPU milliseconds per VM in a phase: the operator's, and the agents'
    /// beyond the steady cost of their running guests (median of the runs; NaN for results
    /// without the steady phase).
    pub fn corescale_ms_per_vm(&self, phase: &str) -> f64 {
        (self.median(&[phase, "cpu_seconds", "operator"])
            + self.median(&[phase, "agents_cpu_seconds_beyond_steady"]))
            * 1000.0
            / self.vms
    }

    /// The kube-apiserver's CPU milliseconds per VM in a phase (median of the runs).
    pub fn apiserver_ms_per_vm(&self, phase: &str) -> f64 {
        self.median(&[phase, "cpu_seconds", "kube-apiserver"]) * 1000.0 / self.vms
    }
}

/// Read result files and group them by size (VMs, then idle VMs), smallest first.
pub fn load(paths: &[String]) -> Result<Vec<Size>> {
    if paths.is_empty() {
        bail!("no result files given");
    }
    let results = paths
        .iter()
        .map(|p| {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading {p}"))?;
            serde_json::from_str(&text).with_context(|| format!("parsing {p}"))
        })
        .collect::<Result<Vec<Value>>>()?;
    group(results)
}

/// Group results by size (VMs, then idle VMs), smallest first.
pub fn group(results: Vec<Value>) -> Result<Vec<Size>> {
    let mut sizes: Vec<Size> = Vec::new();
    for v in results {
        let (vms, idle) = (figure(&v, &["vms"]), figure(&v, &["idle_vms"]).max(0.0));
        if !vms.is_finite() {
            bail!("a result without \"vms\": {v}");
        }
        match sizes.iter_mut().find(|s| s.vms == vms && s.idle == idle) {
            Some(s) => s.runs.push(v),
            None => sizes.push(Size {
                vms,
                idle,
                runs: vec![v],
            }),
        }
    }
    sizes.sort_by(|a, b| {
        (a.vms, a.idle)
            .partial_cmp(&(b.vms, b.idle))
            .expect("finite")
    });
    Ok(sizes)
}

/// The number at `path` in a result (NaN when absent).
pub fn figure(v: &Value, path: &[&str]) -> f64 {
    path.iter()
        .fold(v, |v, k| &v[*k])
        .as_f64()
        .unwrap_or(f64::NAN)
}

/// Print the growth table: each size's medians (and the spread of the two times), then the
/// largest size against the smallest.
pub fn growth(sizes: &[Size]) {
    println!("growth (medians of each size's runs; spread of the times in brackets):");
    println!(
        "  {:>5} {:>5} {:>4} {:>22} {:>22} {:>8} {:>8} {:>9} {:>10} {:>7}",
        "VMs",
        "idle",
        "runs",
        "start s",
        "resize s",
        "op RSS",
        "agt RSS",
        "op CPU s",
        "api ms/VM",
        "req/VM"
    );
    for s in sizes {
        println!(
            "  {:>5} {:>5} {:>4} {:>22} {:>22} {:>8.1} {:>8.1} {:>9.2} {:>10} {:>7.2}",
            s.vms,
            s.idle,
            s.runs.len(),
            format!(
                "{:.2} [{}]",
                s.median(&["start", "seconds"]),
                s.spread(&["start", "seconds"], 1)
            ),
            format!(
                "{:.2} [{}]",
                s.median(&["resize_storm", "seconds"]),
                s.spread(&["resize_storm", "seconds"], 1)
            ),
            s.median(&["resize_storm", "peak_rss_mib", "operator"]),
            s.median(&["resize_storm", "peak_rss_mib", "agent"]),
            s.median(&["start", "cpu_seconds", "operator"])
                + s.median(&["resize_storm", "cpu_seconds", "operator"]),
            format!(
                "{:.1} / {:.1}",
                s.apiserver_ms_per_vm("start"),
                s.apiserver_ms_per_vm("resize_storm")
            ),
            s.median(&["start", "api_requests_per_vm"]),
        );
    }
    let (first, last) = (&sizes[0], &sizes[sizes.len() - 1]);
    if sizes.len() > 1 && last.vms > first.vms {
        let x = last.vms / first.vms;
        let ratio = |p: &[&str]| last.median(p) / first.median(p);
        println!(
            "  {x}x the VMs: start {:.1}x, resize {:.1}x, operator CPU {:.1}x, operator RSS {:.2}x, agent RSS {:.2}x; \
             kube-apiserver CPU per VM {:.2}x (start) and {:.2}x (storm) (linear or better: times <= {x:.0}x, per VM <= 1x)",
            ratio(&["start", "seconds"]),
            ratio(&["resize_storm", "seconds"]),
            ratio(&["start", "cpu_seconds", "operator"]),
            ratio(&["resize_storm", "peak_rss_mib", "operator"]),
            ratio(&["resize_storm", "peak_rss_mib", "agent"]),
            last.apiserver_ms_per_vm("start") / first.apiserver_ms_per_vm("start"),
            last.apiserver_ms_per_vm("resize_storm") / first.apiserver_ms_per_vm("resize_storm"),
        );
        let own = |s: &Size| {
            (
                s.corescale_ms_per_vm("start"),
                s.corescale_ms_per_vm("resize_storm"),
            )
        };
        let steady = |s: &Size| s.median(&["steady", "agents_cpu_seconds_per_vm_second"]) * 1e6;
        let ((a0, b0), (a1, b1)) = (own(first), own(last));
        if [a0, b0, a1, b1].iter().all(|x| x.is_finite()) {
            println!(
                "  corescale's own CPU per VM (operator, and agents beyond the steady cost of running guests): \
                 start {a0:.2} -> {a1:.2} ms ({:.2}x), storm {b0:.2} -> {b1:.2} ms ({:.2}x); \
                 agents' steady cost {:.1} -> {:.1} us per guest per second",
                a1 / a0,
                b1 / b0,
                steady(first),
                steady(last),
            );
        }
    }
}

/// The growth as a PNG: times (left) and peak RSS (right) against the number of VMs.
pub fn plot(out: &Path, sizes: &[Size]) -> Result<()> {
    crate::register_plot_font()?;
    let xmax = sizes.iter().map(|s| s.vms).fold(0.0, f64::max) * 1.05;
    let root = BitMapBackend::new(out, (1100, 450)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(550);
    type Series<'a> = (&'a str, &'a [&'a str], RGBColor);
    let panels: [(&DrawingArea<_, _>, &str, &str, Vec<Series>); 2] = [
        (
            &left,
            "Time until all VMs match (s)",
            "seconds",
            vec![
                ("placement + start", &["start", "seconds"], BLUE),
                ("resize storm", &["resize_storm", "seconds"], RED),
            ],
        ),
        (
            &right,
            "Peak RSS (MiB)",
            "MiB",
            vec![
                (
                    "operator",
                    &["resize_storm", "peak_rss_mib", "operator"],
                    BLUE,
                ),
                (
                    "node agent (max)",
                    &["resize_storm", "peak_rss_mib", "agent"],
                    RED,
                ),
                (
                    "kube-apiserver",
                    &["resize_storm", "peak_rss_mib", "kube-apiserver"],
                    RGBColor(0, 140, 0),
                ),
            ],
        ),
    ];
    for (area, title, unit, series) in panels {
        let ymax = series
            .iter()
            .flat_map(|(_, p, _)| sizes.iter().map(|s| s.median(p)))
            .filter(|v| v.is_finite())
            .fold(0.0, f64::max)
            * 1.15;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(55)
            .build_cartesian_2d(0.0..xmax, 0.0..ymax.max(1.0))?;
        chart
            .configure_mesh()
            .x_desc("VMs (10 simulated nodes)")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .y_desc(unit)
            .draw()?;
        for (label, p, color) in series {
            let pts: Vec<(f64, f64)> = sizes.iter().map(|s| (s.vms, s.median(p))).collect();
            crate::plot::line(&mut chart, label, pts.clone(), color)?;
            chart.draw_series(
                pts.iter()
                    .map(|&(x, y)| Circle::new((x, y), 4, color.filled())),
            )?;
        }
        crate::plot::legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
    }
    root.present()?;
    println!("plot written to {}", out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(vms: u64, idle: Option<u64>, start: f64) -> Value {
        let mut v = json!({"vms": vms, "start": {"seconds": start,
            "cpu_seconds": {"kube-apiserver": start * 2.0}}});
        if let Some(i) = idle {
            v["idle_vms"] = json!(i);
        }
        v
    }

    #[test]
    fn runs_group_by_size_and_idle_store_and_count_by_their_median() {
        let sizes = group(vec![
            run(10000, None, 150.0),
            run(1000, None, 10.0),
            run(1000, Some(9000), 13.0),
            run(1000, None, 30.0),
            run(1000, Some(0), 11.0),
            run(10000, None, 130.0),
        ])
        .unwrap();
        let got: Vec<_> = sizes
            .iter()
            .map(|s| (s.vms, s.idle, s.runs.len()))
            .collect();
        // idle_vms 0 and no idle_vms are the same store.
        assert_eq!(
            got,
            [(1000.0, 0.0, 3), (1000.0, 9000.0, 1), (10000.0, 0.0, 2)]
        );
        // One slow run of three does not move the median.
        assert_eq!(sizes[0].median(&["start", "seconds"]), 11.0);
        assert_eq!(sizes[2].median(&["start", "seconds"]), 140.0);
        assert_eq!(sizes[0].apiserver_ms_per_vm("start"), 22.0);
        assert!(sizes[0].median(&["resize_storm", "seconds"]).is_nan());
    }

    #[test]
    fn a_result_without_its_size_is_refused() {
        assert!(group(vec![json!({"start": {}})]).is_err());
    }
}
