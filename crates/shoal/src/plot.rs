//! SVG plots for `shoal simulate --plot`.
//!
//! A run is drawn twice: the whole trace, and a window (`--from`/`--to`, by default the day
//! with the most violation), each as demand against ready capacity with the violation
//! periods shaded, over a panel of instances (ready, and starting on top). Long traces are
//! reduced to one column per pixel keeping the extremes (highest demand, lowest capacity,
//! any violation), so a short violation is never averaged away. `--sweep --plot` draws each
//! policy's trade-off curve (violation time against instance-hours) with the oracle's point.

use std::ops::Range;
use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use shoal_scale::sim::{SeriesPoint, SimReport};

const WIDTH: u32 = 1600;
const COLUMNS: usize = 1400;
const PALETTE: [RGBColor; 5] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
];

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("plot: {e}")
}

/// One column of a reduced series.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Column {
    pub t: f64,
    pub demand: f64,
    pub capacity: f64,
    pub ready: f64,
    pub starting: f64,
    pub forecast: Option<f64>,
    pub violated: bool,
}

/// Points of `series` inside `window` (seconds), reduced to at most `n` columns.
pub fn reduce(
    series: &[SeriesPoint],
    capacity_rps: f64,
    window: &Range<f64>,
    n: usize,
) -> Vec<Column> {
    let span = (window.end - window.start).max(1e-9);
    let mut out: Vec<Column> = Vec::new();
    let mut bucket_of_last = usize::MAX;
    for p in series.iter().filter(|p| window.contains(&p.t)) {
        let b = (((p.t - window.start) / span) * n as f64) as usize;
        let ready = (p.ready_capacity_rps / capacity_rps.max(1e-12)).round();
        let c = Column {
            t: p.t,
            demand: p.demand_rps,
            capacity: p.ready_capacity_rps,
            ready,
            starting: (f64::from(p.instances) - ready).max(0.0),
            forecast: p.forecast_rps,
            violated: p.demand_rps > p.ready_capacity_rps + 1e-9,
        };
        match out.last_mut() {
            Some(last) if b == bucket_of_last => {
                last.demand = last.demand.max(c.demand);
                last.capacity = last.capacity.min(c.capacity);
                last.ready = last.ready.min(c.ready);
                last.starting = last.starting.max(c.starting);
                last.forecast = c.forecast.or(last.forecast);
                last.violated |= c.violated;
            }
            _ => {
                out.push(c);
                bucket_of_last = b;
            }
        }
    }
    out
}

/// The whole day (from the trace's start) with the most violation summed over the policies,
/// or the day of peak demand when nothing was violated; None for traces under two days.
pub fn worst_day(reports: &[SimReport]) -> Option<Range<f64>> {
    let first = reports.first()?;
    let days = (first.duration_secs / 86400.0).floor() as usize;
    if days < 2 {
        return None;
    }
    let mut violation = vec![0.0; days];
    let mut peak = vec![0.0f64; days];
    for r in reports {
        for w in r.series.windows(2) {
            let d = (w[0].t / 86400.0) as usize;
            if d >= days {
                continue;
            }
            if w[0].demand_rps > w[0].ready_capacity_rps + 1e-9 {
                violation[d] += w[1].t - w[0].t;
            }
            peak[d] = peak[d].max(w[0].demand_rps);
        }
    }
    let score = if violation.iter().any(|v| *v > 0.0) {
        violation
    } else {
        peak
    };
    let day = (0..days).max_by(|a, b| score[*a].total_cmp(&score[*b]))?;
    Some(day as f64 * 86400.0..(day + 1) as f64 * 86400.0)
}

/// Time axis unit for a span: hours up to 3 days, days beyond.
fn unit(span: f64) -> (f64, &'static str) {
    if span > 3.0 * 86400.0 {
        (86400.0, "days")
    } else {
        (3600.0, "hours")
    }
}

fn panels(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    reports: &[SimReport],
    capacity_rps: f64,
    window: &Range<f64>,
    title: &str,
) -> anyhow::Result<()> {
    let (top, bottom) = area.split_vertically(area.dim_in_pixel().1 * 62 / 100);
    let (div, unit_name) = unit(window.end - window.start);
    let x = window.start / div..window.end / div;
    let cols: Vec<Vec<Column>> = reports
        .iter()
        .map(|r| reduce(&r.series, capacity_rps, window, COLUMNS))
        .collect();
    let ymax = cols
        .iter()
        .flatten()
        .map(|c| c.demand.max(c.capacity).max(c.forecast.unwrap_or(0.0)))
        .fold(0.0f64, f64::max)
        .max(1e-6)
        * 1.08;
    let mut chart = ChartBuilder::on(&top)
        .caption(title, ("sans-serif", 18))
        .margin(8)
        .x_label_area_size(0)
        .y_label_area_size(70)
        .build_cartesian_2d(x.clone(), 0f64..ymax)
        .map_err(err)?;
    chart
        .configure_mesh()
        .y_desc("requests/s")
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(err)?;
    // Violation periods first, under the lines: a band per policy.
    let step = (window.end - window.start) / COLUMNS as f64 / div;
    for (i, c) in cols.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let band = ymax / cols.len() as f64;
        let (lo, hi) = (ymax - band * (i + 1) as f64, ymax - band * i as f64);
        chart
            .draw_series(c.iter().filter(|c| c.violated).map(|c| {
                let x0 = c.t / div;
                Rectangle::new(
                    [(x0, lo), (x0 + step.max(1e-9), hi)],
                    color.mix(0.18).filled(),
                )
            }))
            .map_err(err)?;
    }
    let demand = cols
        .first()
        .map(|c| c.iter().map(|c| (c.t / div, c.demand)).collect::<Vec<_>>());
    if let Some(d) = demand {
        chart
            .draw_series(LineSeries::new(d, BLACK.mix(0.75)))
            .map_err(err)?
            .label("demand")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    }
    for (i, (r, c)) in reports.iter().zip(&cols).enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(
                c.iter().map(|c| (c.t / div, c.capacity)),
                color.stroke_width(2),
            ))
            .map_err(err)?
            .label(format!(
                "{} ready capacity ({:.2}% of the time in violation, shaded)",
                r.policy,
                100.0 * r.violation_fraction
            ))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        if c.iter().any(|c| c.forecast.is_some()) {
            let style = color.mix(0.55);
            chart
                .draw_series(LineSeries::new(
                    c.iter().filter_map(|c| c.forecast.map(|f| (c.t / div, f))),
                    style,
                ))
                .map_err(err)?
                .label(format!("{} forecast (one startup ahead)", r.policy))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.4))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(err)?;

    let imax = cols
        .iter()
        .flatten()
        .map(|c| c.ready + c.starting)
        .fold(0.0f64, f64::max)
        .max(1.0)
        * 1.1;
    let mut inst = ChartBuilder::on(&bottom)
        .margin(8)
        .x_label_area_size(35)
        .y_label_area_size(70)
        .build_cartesian_2d(x, 0f64..imax)
        .map_err(err)?;
    inst.configure_mesh()
        .x_desc(unit_name)
        .y_desc("instances")
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(err)?;
    for (i, (r, c)) in reports.iter().zip(&cols).enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        inst.draw_series(LineSeries::new(
            c.iter().map(|c| (c.t / div, c.ready)),
            color.stroke_width(2),
        ))
        .map_err(err)?
        .label(format!("{} ready", r.policy))
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        let style = color.mix(0.45);
        inst.draw_series(LineSeries::new(
            c.iter().map(|c| (c.t / div, c.ready + c.starting)),
            style,
        ))
        .map_err(err)?
        .label(format!("{} ready + starting", r.policy))
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
    }
    inst.configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.4))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(err)?;
    Ok(())
}

/// The whole trace and a window (`window`, else the worst day) of each report.
pub fn timeline(
    path: &Path,
    reports: &[SimReport],
    capacity_rps: f64,
    window: Option<Range<f64>>,
) -> anyhow::Result<()> {
    let Some(first) = reports.first() else {
        return Ok(());
    };
    let whole = 0.0..first.duration_secs.max(1e-6);
    let zoom = window.or_else(|| worst_day(reports));
    let height = if zoom.is_some() { 1200 } else { 620 };
    let root = SVGBackend::new(path, (WIDTH, height)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let names: Vec<&str> = reports.iter().map(|r| r.policy.as_str()).collect();
    let title = format!("shoal simulate: {} — whole trace", names.join(" vs "));
    match &zoom {
        Some(z) => {
            let (a, b) = root.split_vertically(height / 2);
            panels(&a, reports, capacity_rps, &whole, &title)?;
            let (div, u) = unit(z.end - z.start);
            let zt = format!(
                "window {:.1}–{:.1} {u}{}",
                z.start / div,
                z.end / div,
                if window_given(&zoom, reports) {
                    ""
                } else {
                    " (the day with the most violation)"
                }
            );
            panels(&b, reports, capacity_rps, z, &zt)?;
        }
        None => panels(&root, reports, capacity_rps, &whole, &title)?,
    }
    root.present().map_err(err)?;
    Ok(())
}

fn window_given(zoom: &Option<Range<f64>>, reports: &[SimReport]) -> bool {
    zoom.as_ref() != worst_day(reports).as_ref()
}

/// `--sweep --plot`: violation time against instance-hours, a curve per policy (a point per
/// target utilization), and the oracle's point.
pub fn tradeoff(
    path: &Path,
    curves: &[(String, Vec<(f64, SimReport)>)],
    oracle: Option<&SimReport>,
) -> anyhow::Result<()> {
    let pts = curves
        .iter()
        .flat_map(|(_, c)| c.iter().map(|(_, r)| r))
        .chain(oracle);
    let (mut x0, mut x1, mut y1) = (f64::INFINITY, 0.0f64, 0.0f64);
    for r in pts {
        x0 = x0.min(r.instance_hours);
        x1 = x1.max(r.instance_hours);
        y1 = y1.max(100.0 * r.violation_fraction);
    }
    if !x0.is_finite() {
        return Ok(());
    }
    let pad = (x1 - x0).max(1.0) * 0.05;
    let root = SVGBackend::new(path, (1200, 800)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "shoal simulate --sweep: time in violation against instance-hours (lower left is better)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((x0 - pad)..(x1 + pad), 0f64..(y1.max(1e-3) * 1.1))
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("instance-hours")
        .y_desc("% of the time in violation")
        .draw()
        .map_err(err)?;
    for (i, (name, c)) in curves.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let mut line: Vec<(f64, f64)> = c
            .iter()
            .map(|(_, r)| (r.instance_hours, 100.0 * r.violation_fraction))
            .collect();
        line.sort_by(|a, b| a.0.total_cmp(&b.0));
        chart
            .draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))
            .map_err(err)?
            .label(name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(line.iter().map(|p| Circle::new(*p, 4, color.filled())))
            .map_err(err)?;
        chart
            .draw_series(c.iter().map(|(u, r)| {
                Text::new(
                    format!("{u:.2}"),
                    (r.instance_hours, 100.0 * r.violation_fraction),
                    ("sans-serif", 12).into_font().color(&color),
                )
            }))
            .map_err(err)?;
    }
    if let Some(o) = oracle {
        let p = (o.instance_hours, 100.0 * o.violation_fraction);
        chart
            .draw_series([Cross::new(p, 8, BLACK.stroke_width(3))])
            .map_err(err)?
            .label("oracle (perfect foresight)")
            .legend(|(x, y)| Cross::new((x + 10, y), 6, BLACK.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.4))
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(t: f64, demand: f64, ready: u32, instances: u32) -> SeriesPoint {
        SeriesPoint {
            t,
            demand_rps: demand,
            ready_capacity_rps: f64::from(ready) * 10.0,
            instances,
            forecast_rps: None,
        }
    }

    #[test]
    fn reduction_keeps_a_short_violation_and_the_extremes() {
        // 1000 points into 10 columns; one point in violation in the middle.
        let mut s: Vec<SeriesPoint> = (0..1000).map(|i| p(i as f64, 5.0, 1, 1)).collect();
        s[555] = p(555.0, 50.0, 1, 3);
        let c = reduce(&s, 10.0, &(0.0..1000.0), 10);
        assert_eq!(c.len(), 10);
        let hit: Vec<usize> = (0..10).filter(|&i| c[i].violated).collect();
        assert_eq!(hit, vec![5]);
        assert_eq!(c[5].demand, 50.0);
        assert_eq!((c[5].ready, c[5].starting), (1.0, 2.0));
        // A window keeps only its points.
        let w = reduce(&s, 10.0, &(100.0..200.0), 1000);
        assert_eq!(w.len(), 100);
        assert!(w.iter().all(|c| (100.0..200.0).contains(&c.t)));
    }

    fn report(days: usize, bad_day: usize) -> SimReport {
        let series = (0..days * 24)
            .map(|h| {
                let t = h as f64 * 3600.0;
                let d = if h / 24 == bad_day { 30.0 } else { 5.0 };
                p(t, d, 1, 1)
            })
            .collect();
        SimReport {
            policy: "reactive".into(),
            violation_seconds: 0.0,
            violation_fraction: 0.0,
            unserved_fraction: 0.0,
            instance_hours: 0.0,
            scale_events: 0,
            duration_secs: days as f64 * 86400.0,
            reasons: Default::default(),
            series,
        }
    }

    #[test]
    fn the_worst_day_is_the_one_with_most_violation() {
        let r = report(5, 3);
        assert_eq!(worst_day(&[r]), Some(3.0 * 86400.0..4.0 * 86400.0));
        assert_eq!(worst_day(&[report(1, 0)]), None);
    }
}
