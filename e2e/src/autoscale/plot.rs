//! The `autoscale` scenario's picture: busy cores in the guest, `spec.cpus` (what the
//! autoscaler asked) and online vCPUs over time, with the busy loops shaded in.

use super::{Sample, TARGET};
use anyhow::Result;
use std::path::Path;

/// Draw the samples into a PNG at `out`.
pub fn plot(out: &Path, samples: &[Sample]) -> Result<()> {
    use plotters::prelude::*;
    crate::register_plot_font()?;
    let tmax = samples.last().map_or(1.0, |x| x.t).max(1.0);
    let ymax = samples
        .iter()
        .map(|x| {
            f64::from(x.desired.max(x.online)).max(if x.busy.is_finite() { x.busy } else { 0.0 })
        })
        .fold(1.0, f64::max)
        + 0.5;
    let root = BitMapBackend::new(out, (1000, 450)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "KEDA + HPA drive spec.cpus from guest load (target {TARGET} busy cores per vCPU)"
            ),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..tmax, 0.0..ymax)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("cores / vCPUs")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()?;
    // Shade the time each number of busy loops ran.
    for w in samples.windows(2) {
        if w[0].loops > 0 {
            let shade = RGBColor(255, 200, 120).mix(0.15 * f64::from(w[0].loops));
            chart.draw_series(std::iter::once(Rectangle::new(
                [(w[0].t, 0.0), (w[1].t, ymax)],
                shade.filled(),
            )))?;
        }
    }
    let busy: Vec<(f64, f64)> = samples
        .iter()
        .filter(|x| x.busy.is_finite())
        .map(|x| (x.t, x.busy))
        .collect();
    let desired: Vec<(f64, f64)> = samples
        .iter()
        .map(|x| (x.t, f64::from(x.desired)))
        .collect();
    let online: Vec<(f64, f64)> = samples.iter().map(|x| (x.t, f64::from(x.online))).collect();
    for (label, pts, color) in [
        ("busy cores (recorded, rate 1m)", busy, RGBColor(200, 60, 0)),
        ("spec.cpus (HPA via /scale)", desired, BLUE),
        ("online vCPUs (guest)", online, RGBColor(0, 140, 0)),
    ] {
        crate::plot::line(&mut chart, label, pts, color)?;
    }
    crate::plot::legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    root.present()?;
    Ok(())
}
