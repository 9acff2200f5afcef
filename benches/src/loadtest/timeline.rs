//! The timeline picture: throughput, latency percentiles and open sockets (with the edges'
//! memory) per second, one panel each, with the injected faults marked in all three.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use super::report::Report;

/// A panel: title, unit, and its lines (name, colour, points).
type Panel<'a> = (&'a str, &'a str, Vec<(&'a str, RGBColor, Vec<(f64, f64)>)>);

pub fn draw(r: &Report, path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (1200, 1240)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let panels = root.split_evenly((4, 1));
    let t = &r.timeline;
    let xmax = (t.len().max(1)) as f64;
    let series: [Panel; 4] = [
        (
            "Throughput (HTTP requests, runs and handshakes completed per second)",
            "per s",
            vec![
                (
                    "completed",
                    BLUE,
                    t.iter()
                        .enumerate()
                        .map(|(i, s)| (i as f64, s.requests as f64))
                        .collect(),
                ),
                (
                    "errors",
                    RED,
                    t.iter()
                        .enumerate()
                        .map(|(i, s)| (i as f64, s.errors as f64))
                        .collect(),
                ),
            ],
        ),
        (
            "Latency of what completed in each second (ms)",
            "ms",
            vec![
                (
                    "p50",
                    GREEN,
                    t.iter()
                        .enumerate()
                        .map(|(i, s)| (i as f64, s.p50_ms))
                        .collect(),
                ),
                (
                    "p99",
                    MAGENTA,
                    t.iter()
                        .enumerate()
                        .map(|(i, s)| (i as f64, s.p99_ms))
                        .collect(),
                ),
            ],
        ),
        (
            "Open sockets (clients) and edge memory (MiB RSS, all replicas)",
            "count / MiB",
            vec![
                (
                    "open sockets",
                    BLUE,
                    t.iter()
                        .enumerate()
                        .map(|(i, s)| (i as f64, s.open_sockets as f64))
                        .collect(),
                ),
                (
                    "edge RSS MiB",
                    RGBColor(230, 120, 0),
                    t.iter()
                        .enumerate()
                        .map(|(i, s)| (i as f64, s.edge_rss_mib))
                        .collect(),
                ),
            ],
        ),
        (
            "The machine: CPU busy (all cores, %) and memory in use (GiB x 10)",
            "% / GiB x 10",
            vec![
                (
                    "CPU busy %",
                    RED,
                    t.iter()
                        .enumerate()
                        .map(|(i, s)| (i as f64, s.cpu_busy_pct))
                        .collect(),
                ),
                (
                    "memory GiB x 10",
                    BLUE,
                    t.iter()
                        .enumerate()
                        .map(|(i, s)| (i as f64, s.mem_used_gib * 10.0))
                        .collect(),
                ),
            ],
        ),
    ];
    for (area, (title, unit, lines)) in panels.iter().zip(series) {
        let ymax = lines
            .iter()
            .flat_map(|l| l.2.iter().map(|p| p.1))
            .fold(1.0f64, f64::max)
            * 1.15;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..xmax, 0f64..ymax)
            .map_err(|e| anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .x_desc("seconds into the run")
            .y_desc(unit)
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        for (name, color, points) in lines {
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))
                .map_err(|e| anyhow!("{e}"))?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        for f in &r.faults {
            let end = f.at_s + f.recovered_after_s.unwrap_or(0.0);
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(f.at_s, 0.0), (end.max(f.at_s + 0.3), ymax)],
                    RED.mix(0.12).filled(),
                )))
                .map_err(|e| anyhow!("{e}"))?;
            chart
                .draw_series(std::iter::once(Text::new(
                    f.kind.clone(),
                    (f.at_s, ymax * 0.97),
                    ("sans-serif", 13).into_font().color(&RED),
                )))
                .map_err(|e| anyhow!("{e}"))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
    }
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}
