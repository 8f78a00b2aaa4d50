//! What every plot of the e2e and benchmarks draws the same way: a line with its legend
//! entry, and the legend box.

use anyhow::Result;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

/// A chart of f64 on both axes, drawn into a PNG.
pub type Chart<'a, 'b> =
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// Draw `pts` as a line 2 px wide in `color`, listed in the legend as `label`.
pub fn line(
    chart: &mut Chart<'_, '_>,
    label: &str,
    pts: Vec<(f64, f64)>,
    color: RGBColor,
) -> Result<()> {
    chart
        .draw_series(LineSeries::new(pts, color.stroke_width(2)))?
        .label(label)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
    Ok(())
}

/// Draw the legend at `position`, on a white box with a black border.
pub fn legend<'a>(chart: &mut Chart<'a, 'a>, position: SeriesLabelPosition) -> Result<()> {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}
