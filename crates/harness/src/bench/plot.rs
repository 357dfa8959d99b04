//! `apfvm bench --plot`: compute work against fetch latency, one line per mode (SVG).

use std::time::Duration;

use pager::Prefetch;
use plotters::prelude::*;

use super::mode::{Mode, Source};
use super::row::Row;
use super::table::latency_label;
use crate::error::{Error, Result};

fn color(m: Mode) -> RGBColor {
    match m {
        Mode::Eager => RGBColor(0, 0, 0),
        Mode::Off => RGBColor(214, 39, 40),
        Mode::OffHalt => RGBColor(255, 127, 14),
        Mode::ApfV1 => RGBColor(44, 160, 44),
        Mode::ApfV2 => RGBColor(31, 119, 180),
        Mode::Kernel => RGBColor(148, 103, 189),
        Mode::ApfWs => RGBColor(23, 190, 207),
        Mode::OffWs => RGBColor(140, 86, 75),
    }
}

/// `mode`'s points: (x = index of its latency in `lats`, median, min, max), in millions.
#[allow(clippy::cast_precision_loss)]
fn points(sel: &[&Row], lats: &[u64], mode: Mode) -> Vec<(f64, f64, f64, f64)> {
    let m = |n: u64| n as f64 / 1e6;
    lats.iter()
        .enumerate()
        .filter_map(|(i, us)| {
            sel.iter()
                .find(|r| r.mode == mode && r.fetch_latency_us == *us)
                .map(|r| {
                    (
                        i as f64,
                        m(r.compute_work),
                        m(r.compute_work_min),
                        m(r.compute_work_max),
                    )
                })
        })
        .collect()
}

/// The rows a bench plots: 1 vCPU and 4 tasks per vCPU when measured, else the first row's.
pub fn plotted_setup(rows: &[Row]) -> Option<(u32, u32)> {
    if rows.iter().any(|r| r.vcpus == 1 && r.tasks_per_vcpu == 4) {
        Some((1, 4))
    } else {
        rows.first().map(|r| (r.vcpus, r.tasks_per_vcpu))
    }
}

/// Draws the plain rows (memory file, no prefetch) of `(vcpus, tasks_per_vcpu)` as an SVG
/// document: x = fetch latency (the measured values, evenly spaced), y = median compute
/// work in millions of iterations, with the repeats' min..max as a bar.
#[allow(clippy::cast_precision_loss)]
pub fn plot(rows: &[Row], vcpus: u32, tasks_per_vcpu: u32) -> Result<String> {
    let sel: Vec<&Row> = rows
        .iter()
        .filter(|r| r.vcpus == vcpus && r.tasks_per_vcpu == tasks_per_vcpu)
        // The plain rows only (memory file, no prefetch): one line per mode.
        .filter(|r| r.source == Source::File && r.prefetch == Prefetch::None)
        .collect();
    let mut lats: Vec<u64> = sel.iter().map(|r| r.fetch_latency_us).collect();
    lats.sort_unstable();
    lats.dedup();
    if lats.is_empty() {
        return Err(Error::Plot(format!(
            "no result for {vcpus} vCPU and {tasks_per_vcpu} tasks per vCPU"
        )));
    }
    let ymax = sel
        .iter()
        .map(|r| r.compute_work_max as f64 / 1e6)
        .fold(1.0, f64::max)
        * 1.1;
    let err = |e: &dyn std::fmt::Display| Error::Plot(e.to_string());
    let mut svg = String::new();
    let root = SVGBackend::with_string(&mut svg, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let n = lats.len();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "compute work in the window vs fetch latency ({vcpus} vCPU, {tasks_per_vcpu} tasks per vCPU)"
            ),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.3f64..(n as f64 - 0.7), 0f64..ymax)
        .map_err(|e| err(&e))?;
    let labels = lats.clone();
    chart
        .configure_mesh()
        .x_labels(n)
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 0.01 && i >= 0.0 {
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                labels.get(i as usize).map_or(String::new(), |us| {
                    latency_label(Duration::from_micros(*us))
                })
            } else {
                String::new()
            }
        })
        .x_desc("fetch latency per 64 KiB chunk")
        .y_desc("compute iterations (millions)")
        .draw()
        .map_err(|e| err(&e))?;
    let mut modes: Vec<Mode> = sel.iter().map(|r| r.mode).collect();
    modes.sort_unstable();
    modes.dedup();
    for m in modes {
        let c = color(m);
        let pts = points(&sel, &lats, m);
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|p| (p.0, p.1)),
                c.stroke_width(2),
            ))
            .map_err(|e| err(&e))?
            .label(m.name())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart
            .draw_series(pts.iter().map(|p| Circle::new((p.0, p.1), 3, c.filled())))
            .map_err(|e| err(&e))?;
        chart
            .draw_series(
                pts.iter()
                    .map(|p| PathElement::new(vec![(p.0, p.2), (p.0, p.3)], c.stroke_width(1))),
            )
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    drop(chart);
    drop(root);
    Ok(svg)
}
