//! `mlx5vf migrate --report FILE.svg`: a migration's timeline drawn as an SVG chart.
//!
//! One column per pre-copy round, then one for stop-copy. Each round has a bar of the
//! stream bytes it moved ([`ROUND_COLOR`]) and a dot of the dirty bytes PRECOPY_INFO
//! reported at its end ([`DIRTY_COLOR`]); a round that ended with initial bytes still
//! to come has a dot of those too ([`INITIAL_COLOR`]). Stop-copy is one bar
//! ([`STOP_COPY_COLOR`]) labelled with the downtime. So the chart holds exactly one
//! bar and one dirty dot per round: what `tests/cli.rs` counts.

use plotters::prelude::*;

use crate::migration::live::LiveReport;

/// The fill of a pre-copy round's bar (bytes moved).
pub const ROUND_COLOR: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
/// The fill of the stop-copy bar.
pub const STOP_COPY_COLOR: RGBColor = RGBColor(0xd6, 0x27, 0x28);
/// The fill of a round's dirty-bytes dot.
pub const DIRTY_COLOR: RGBColor = RGBColor(0xff, 0x7f, 0x0e);
/// The fill of a round's initial-bytes dot (initial image still to come).
pub const INITIAL_COLOR: RGBColor = RGBColor(0x2c, 0xa0, 0x2c);

/// The `fill` attribute the SVG gives a mark of colour `c` (`#RRGGBB`).
pub fn fill(c: RGBColor) -> String {
    format!("#{:02X}{:02X}{:02X}", c.0, c.1, c.2)
}

const WIDTH: u32 = 800;
const HEIGHT: u32 = 480;

/// A chart that could not be drawn.
#[derive(Debug, thiserror::Error)]
#[error("drawing the migration timeline: {0}")]
pub struct ReportError(String);

fn err(e: impl std::fmt::Display) -> ReportError {
    ReportError(e.to_string())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 20)
}

/// The SVG text of `r`'s timeline.
pub fn timeline_svg(r: &LiveReport) -> Result<String, ReportError> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let n = r.rounds.len();
        let top = r
            .rounds
            .iter()
            .flat_map(|x| [x.bytes, x.dirty_bytes, x.initial_bytes])
            .chain([r.stop_copy_bytes])
            .map(mib)
            .fold(0.0f64, f64::max)
            .max(1.0 / 1024.0)
            * 1.15;
        let caption = format!(
            "{n} pre-copy rounds, stop-copy {:.2} MiB, downtime {:.1} ms, total {:.1} ms",
            mib(r.stop_copy_bytes),
            r.downtime.as_secs_f64() * 1e3,
            r.total.as_secs_f64() * 1e3
        );
        let columns = n as f64 + 1.0;
        let mut chart = ChartBuilder::on(&root)
            .caption(caption, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..columns, -top * 0.07..top)
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_desc("pre-copy round (last column: stop-copy)")
            .y_desc("MiB")
            .x_labels(0)
            .y_label_formatter(&|y| {
                if *y < 0.0 {
                    String::new()
                } else {
                    format!("{y:.1}")
                }
            })
            .draw()
            .map_err(err)?;
        // Column labels under the bars: the round's number, "stop" for stop-copy.
        chart
            .draw_series((0..=n).map(|i| {
                let label = if i < n {
                    format!("{}", i + 1)
                } else {
                    "stop".to_string()
                };
                Text::new(label, (i as f64 + 0.45, -top * 0.02), ("sans-serif", 12))
            }))
            .map_err(err)?;
        let bar = |i: usize, bytes: u64, color: RGBColor| {
            let x = i as f64;
            Rectangle::new([(x + 0.2, 0.0), (x + 0.8, mib(bytes))], color.filled())
        };
        chart
            .draw_series(
                r.rounds
                    .iter()
                    .enumerate()
                    .map(|(i, x)| bar(i, x.bytes, ROUND_COLOR)),
            )
            .map_err(err)?
            .label("bytes moved")
            .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], ROUND_COLOR.filled()));
        chart
            .draw_series(r.rounds.iter().enumerate().map(|(i, x)| {
                Circle::new(
                    (i as f64 + 0.5, mib(x.dirty_bytes)),
                    5,
                    DIRTY_COLOR.filled(),
                )
            }))
            .map_err(err)?
            .label("dirty bytes at the round's end")
            .legend(|(x, y)| Circle::new((x + 5, y), 5, DIRTY_COLOR.filled()));
        chart
            .draw_series(
                r.rounds
                    .iter()
                    .enumerate()
                    .filter(|(_, x)| x.initial_bytes > 0)
                    .map(|(i, x)| {
                        Circle::new(
                            (i as f64 + 0.5, mib(x.initial_bytes)),
                            4,
                            INITIAL_COLOR.filled(),
                        )
                    }),
            )
            .map_err(err)?;
        chart
            .draw_series(std::iter::once(bar(n, r.stop_copy_bytes, STOP_COPY_COLOR)))
            .map_err(err)?
            .label("stop-copy bytes")
            .legend(|(x, y)| {
                Rectangle::new([(x, y - 5), (x + 10, y + 5)], STOP_COPY_COLOR.filled())
            });
        chart
            .draw_series(std::iter::once(Text::new(
                format!("downtime {:.1} ms", r.downtime.as_secs_f64() * 1e3),
                (n as f64 + 0.05, mib(r.stop_copy_bytes) + top * 0.04),
                ("sans-serif", 14),
            )))
            .map_err(err)?;
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// Writes `r`'s timeline to `path`.
pub fn write_timeline(path: &std::path::Path, r: &LiveReport) -> Result<(), ReportError> {
    let svg = timeline_svg(r)?;
    std::fs::write(path, svg).map_err(|e| ReportError(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::live::Round;
    use std::time::Duration;

    fn count(svg: &str, tag: &str, c: RGBColor) -> usize {
        let doc = roxmltree::Document::parse(svg).expect("the SVG parses");
        doc.descendants()
            .filter(|n| n.has_tag_name(tag) && n.attribute("fill") == Some(&fill(c)[..]))
            .count()
    }

    fn report(rounds: usize) -> LiveReport {
        LiveReport {
            rounds: (0..rounds)
                .map(|i| Round {
                    bytes: (64 << 20) >> i,
                    initial_bytes: if i == 0 { 1 << 20 } else { 0 },
                    dirty_bytes: (2 << 20) >> i,
                    at: Duration::from_millis(100 * i as u64),
                })
                .collect(),
            stop_copy_bytes: 3 << 20,
            bytes: 0,
            downtime: Duration::from_millis(12),
            total: Duration::from_millis(900),
        }
    }

    #[test]
    fn the_svg_parses_and_holds_one_bar_and_one_dirty_dot_per_round() {
        for rounds in [0, 1, 3, 16] {
            let svg = timeline_svg(&report(rounds)).expect("draw");
            // The legend adds one of each.
            assert_eq!(count(&svg, "rect", ROUND_COLOR), rounds + 1, "{rounds}");
            assert_eq!(count(&svg, "circle", DIRTY_COLOR), rounds + 1, "{rounds}");
            assert_eq!(count(&svg, "rect", STOP_COPY_COLOR), 2, "{rounds}");
            assert!(svg.contains("downtime 12.0 ms"), "{rounds}");
        }
    }
}
