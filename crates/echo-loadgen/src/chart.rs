//! The chart: latency percentiles and server memory against connections,
//! and the server's context switches per message when they were sampled
//! (`--server-pid` with messages flowing).
//!
//! SVG, drawn with plotters' SVG backend, which needs no system libraries
//! or font files. One run draws p50/p90/p99/p99.9; several runs (a
//! comparison of servers) draw p50 and p99 of each in its own colour.

use std::path::Path;

use plotters::prelude::*;

use crate::result::RunResult;

const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

struct Series {
    name: String,
    colour: RGBColor,
    width: u32,
    points: Vec<(f64, f64)>,
}

fn name(r: &RunResult, i: usize) -> String {
    r.label.clone().unwrap_or_else(|| format!("run {}", i + 1))
}

fn latency_series(runs: &[RunResult]) -> Vec<Series> {
    let mut out = Vec::new();
    let pcts: &[(f64, &str)] = if runs.len() == 1 {
        &[(50.0, "p50"), (90.0, "p90"), (99.0, "p99"), (99.9, "p99.9")]
    } else {
        &[(50.0, "p50"), (99.0, "p99")]
    };
    for (i, r) in runs.iter().enumerate() {
        for (j, (p, pname)) in pcts.iter().enumerate() {
            let points: Vec<(f64, f64)> = r
                .steps
                .iter()
                .filter(|s| !s.hold.latency.is_empty())
                .map(|s| {
                    (s.open_connections as f64, (s.hold.latency.percentile(*p) as f64 / 1000.0).max(0.001))
                })
                .collect();
            if points.is_empty() {
                continue;
            }
            let (colour, width) = if runs.len() == 1 {
                (COLOURS[j % 6], 2)
            } else {
                (COLOURS[i % 6], if *p >= 99.0 { 3 } else { 1 })
            };
            let name = if runs.len() == 1 { pname.to_string() } else { format!("{} {pname}", name(r, i)) };
            out.push(Series { name, colour, width, points });
        }
    }
    out
}

fn memory_series(runs: &[RunResult]) -> Vec<Series> {
    per_run_series(runs, "server RSS", |r| {
        r.steps
            .iter()
            .filter_map(|s| {
                let rss = s.server.as_ref()?.rss_bytes?;
                Some((s.open_connections as f64, rss as f64 / (1024.0 * 1024.0)))
            })
            .collect()
    })
}

/// Server context switches per message echoed, per step that has them.
fn switches_series(runs: &[RunResult]) -> Vec<Series> {
    per_run_series(runs, "context switches per message", |r| {
        r.steps
            .iter()
            // A step where connections failed has few messages and the
            // switches of its failures: per message, meaningless.
            .filter(|s| s.open_connections == s.target_connections && !s.server_exited)
            .filter_map(|s| Some((s.open_connections as f64, s.derived.server_ctxt_switches_per_message?)))
            .collect()
    })
}

/// One line per run that has `points`: named `single` when it is the only
/// run, else by its run.
fn per_run_series(
    runs: &[RunResult],
    single: &str,
    points: impl Fn(&RunResult) -> Vec<(f64, f64)>,
) -> Vec<Series> {
    runs.iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let points = points(r);
            (!points.is_empty()).then(|| Series {
                name: if runs.len() == 1 { single.into() } else { name(r, i) },
                colour: if runs.len() == 1 { COLOURS[0] } else { COLOURS[i % 6] },
                width: 2,
                points,
            })
        })
        .collect()
}

/// A panel with a linear y axis from 0: memory, context switches.
fn linear_panel(area: &Area, series: &[Series], caption: &str, y_desc: &str) -> anyhow::Result<()> {
    let err = |e: DrawingAreaErrorKind<_>| anyhow::anyhow!("chart: {e}");
    let max = series.iter().flat_map(|s| &s.points).map(|p| p.1).fold(1.0, f64::max);
    let xr = series_x_range(series);
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(xr, 0.0..max * 1.1)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("connections")
        .y_desc(y_desc)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()
        .map_err(err)?;
    draw_series(&mut chart, series).map_err(err)?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    Ok(())
}

/// A panel with a logarithmic y axis: context switches per message run
/// from hundredths (an event loop under load) to several (threads).
fn log_panel(
    area: &Area,
    x: std::ops::Range<f64>,
    series: &[Series],
    caption: &str,
    y_desc: &str,
) -> anyhow::Result<()> {
    let err = |e: DrawingAreaErrorKind<_>| anyhow::anyhow!("chart: {e}");
    // A log axis cannot show 0: a step without a switch is drawn at 0.001.
    let clamped: Vec<Series> = series
        .iter()
        .map(|s| Series {
            name: s.name.clone(),
            colour: s.colour,
            width: s.width,
            points: s.points.iter().map(|&(x, y)| (x, y.max(0.001))).collect(),
        })
        .collect();
    let max = clamped.iter().flat_map(|s| &s.points).map(|p| p.1).fold(0.001, f64::max);
    let min = clamped.iter().flat_map(|s| &s.points).map(|p| p.1).fold(f64::MAX, f64::min);
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(x, ((min / 2.0)..(max * 2.0)).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("connections")
        .y_desc(y_desc)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()
        .map_err(err)?;
    draw_series(&mut chart, &clamped).map_err(err)?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    Ok(())
}

fn series_x_range(series: &[Series]) -> std::ops::Range<f64> {
    let max = series.iter().flat_map(|s| &s.points).map(|p| p.0).fold(1.0, f64::max);
    0.0..max * 1.05
}

fn x_range(runs: &[RunResult]) -> std::ops::Range<f64> {
    let max = runs
        .iter()
        .flat_map(|r| &r.steps)
        .map(|s| s.open_connections.max(s.target_connections))
        .max()
        .unwrap_or(1);
    0.0..(max as f64 * 1.05).max(1.0)
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

fn draw_series<'a, DB: DrawingBackend + 'a, CT: plotters::coord::CoordTranslate<From = (f64, f64)>>(
    chart: &mut ChartContext<'a, DB, CT>,
    series: &[Series],
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    for s in series {
        let style = ShapeStyle { color: s.colour.to_rgba(), filled: true, stroke_width: s.width };
        chart
            .draw_series(LineSeries::new(s.points.clone(), style))?
            .label(s.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], style));
        chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 3, style)))?;
    }
    Ok(())
}

fn empty(area: &Area, text: &str) -> anyhow::Result<()> {
    area.draw(&Text::new(text.to_string(), (60, 120), ("sans-serif", 18).into_font().color(&BLACK)))
        .map_err(|e| anyhow::anyhow!("chart: {e}"))
}

/// Writes the chart of one or more runs to `path` (SVG).
pub fn draw(runs: &[RunResult], path: &Path) -> anyhow::Result<()> {
    let err = |e: DrawingAreaErrorKind<_>| anyhow::anyhow!("chart {}: {e}", path.display());
    let switches = switches_series(runs);
    let height = if switches.is_empty() { 800 } else { 1150 };
    let root = SVGBackend::new(path, (1000, height)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let title = match runs {
        [r] => format!(
            "{} — {} msg/s/conn, {} B",
            r.label.as_deref().unwrap_or(&r.url),
            r.settings.rate,
            r.settings.size
        ),
        _ => {
            let names: Vec<String> = runs.iter().enumerate().map(|(i, r)| name(r, i)).collect();
            format!("{} — {} msg/s/conn", names.join(" vs "), runs[0].settings.rate)
        }
    };
    let root = root.titled(&title, ("sans-serif", 22)).map_err(err)?;
    let (top, rest) = root.split_vertically(400);
    let (bottom, third) = if switches.is_empty() {
        (rest, None)
    } else {
        let (a, b) = rest.split_vertically(375);
        (a, Some(b))
    };
    let xr = x_range(runs);

    let lat = latency_series(runs);
    if lat.is_empty() {
        empty(&top, "no latency samples (idle connections)")?;
    } else {
        log_panel(&top, xr.clone(), &lat, "echo latency from scheduled send (ms, log scale)", "ms")?;
    }

    let mem = memory_series(runs);
    if mem.is_empty() {
        empty(&bottom, "no server memory readings (use --server-pid or --server-metrics)")?;
    } else {
        linear_panel(&bottom, &mem, "server resident memory (MiB)", "MiB")?;
    }
    if let Some(area) = third {
        log_panel(
            &area,
            xr,
            &switches,
            "server context switches per message echoed (all threads; steps with every connection open; log scale)",
            "switches",
        )?;
    }
    root.present().map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::result::tests::{run, step};

    #[test]
    fn draws_an_svg_with_both_panels() {
        let dir = std::env::temp_dir().join(format!("elg-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.svg");
        let r = run(vec![step(100, 1000, &[100; 1000]), step(200, 2000, &[300; 2000])]);
        draw(std::slice::from_ref(&r), &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("p99.9") && svg.contains("server RSS") && svg.contains("<polyline"));
        let mut other = r.clone();
        other.label = Some("peer".into());
        draw(&[r, other], &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains("peer p99"));
        // step() carries context switches: a third panel.
        assert!(svg.contains("context switches per message echoed"));
        let mut idle = run(vec![step(100, 0, &[])]);
        idle.steps[0].server.as_mut().unwrap().ctxt_switches = None;
        idle.derive();
        draw(&[idle], &path).unwrap();
        assert!(!std::fs::read_to_string(&path).unwrap().contains("context switches"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
