//! A hand-written SVG chart: panels of grouped bars (one group per
//! dataplane, one bar per series), each bar the median with a whisker from
//! the smallest to the largest round, the median written above it.
use std::fmt::Write;

use super::datapath::Summary;

pub struct Panel {
    pub title: String,
    pub unit: String,
    /// One group of bars per entry (the dataplanes).
    pub groups: Vec<String>,
    /// One bar per entry in every group.
    pub series: Vec<String>,
    /// `values[group][series]`.
    pub values: Vec<Vec<Summary>>,
}

const COLORS: [&str; 6] = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1"];
/// Width of the bars of one group together, and the gap between groups.
const GROUP_W: f64 = 78.0;
const GROUP_GAP: f64 = 26.0;
const PLOT_H: f64 = 260.0;
const LEFT: f64 = 62.0;
const TOP: f64 = 84.0;
const BOTTOM: f64 = 30.0;
const PANEL_GAP: f64 = 24.0;

/// The whole chart: `title` on top, the panels side by side.
pub fn chart(title: &str, panels: &[Panel]) -> String {
    let widths: Vec<f64> =
        panels.iter().map(|p| LEFT + p.groups.len() as f64 * (GROUP_W + GROUP_GAP) + GROUP_GAP).collect();
    let width = widths.iter().sum::<f64>() + PANEL_GAP * (panels.len().saturating_sub(1)) as f64 + 20.0;
    let height = TOP + PLOT_H + BOTTOM + 28.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(s, r#"<text x="10" y="22" font-size="15" font-weight="bold">{}</text>"#, esc(title));
    let mut x = 10.0;
    for (p, w) in panels.iter().zip(&widths) {
        panel(&mut s, p, x, *w);
        x += w + PANEL_GAP;
    }
    let _ = writeln!(
        s,
        r##"<text x="10" y="{:.0}" font-size="11" fill="#555">bars: median of the rounds; whiskers: smallest to largest round</text>"##,
        height - 8.0
    );
    s.push_str("</svg>\n");
    s
}

fn panel(s: &mut String, p: &Panel, x0: f64, w: f64) {
    let max = p
        .values
        .iter()
        .flatten()
        .map(|v| if v.max.is_finite() { v.max.max(v.median) } else { v.median })
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max);
    let (step, top) = nice_axis(max);
    let y_of = |v: f64| TOP + PLOT_H - (v.max(0.0) / top) * PLOT_H;
    let plot_x = x0 + LEFT;
    let plot_w = w - LEFT;

    let _ = writeln!(s, r#"<g>"#);
    let _ = writeln!(s, r#"<text x="{:.1}" y="48" font-size="13" font-weight="bold">{}</text>"#, x0, esc(&p.title));
    // Legend.
    let mut lx = x0;
    for (i, name) in p.series.iter().enumerate() {
        let _ = writeln!(
            s,
            r#"<rect x="{lx:.1}" y="58" width="11" height="11" fill="{}"/><text x="{:.1}" y="68" font-size="11">{}</text>"#,
            COLORS[i % COLORS.len()],
            lx + 15.0,
            esc(name)
        );
        lx += 15.0 + 7.0 * name.chars().count() as f64 + 14.0;
    }
    // Axis, grid and ticks.
    let mut v = 0.0;
    while v <= top + step * 1e-9 {
        let y = y_of(v);
        let _ = writeln!(
            s,
            r##"<line x1="{plot_x:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e3e3e3"/><text x="{:.1}" y="{:.1}" font-size="10" text-anchor="end" fill="#444">{}</text>"##,
            plot_x + plot_w,
            plot_x - 6.0,
            y + 3.5,
            tick(v, step)
        );
        v += step;
    }
    let _ = writeln!(
        s,
        r##"<line x1="{plot_x:.1}" y1="{TOP:.1}" x2="{plot_x:.1}" y2="{:.1}" stroke="#444"/><line x1="{plot_x:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#444"/>"##,
        TOP + PLOT_H,
        TOP + PLOT_H,
        plot_x + plot_w,
        TOP + PLOT_H
    );
    let _ = writeln!(
        s,
        r##"<text transform="translate({:.1},{:.1}) rotate(-90)" font-size="11" text-anchor="middle" fill="#444">{}</text>"##,
        x0 + 12.0,
        TOP + PLOT_H / 2.0,
        esc(&p.unit)
    );
    // Bars.
    let n = p.series.len().max(1) as f64;
    let bar_w = GROUP_W / n;
    for (g, name) in p.groups.iter().enumerate() {
        let gx = plot_x + GROUP_GAP + g as f64 * (GROUP_W + GROUP_GAP);
        for (i, v) in p.values.get(g).into_iter().flatten().enumerate() {
            if !v.median.is_finite() {
                continue;
            }
            let bx = gx + i as f64 * bar_w;
            let y = y_of(v.median);
            let _ = writeln!(
                s,
                r#"<rect x="{:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{} {}: {} {} (rounds {}-{})</title></rect>"#,
                bx + 1.0,
                bar_w - 2.0,
                (TOP + PLOT_H - y).max(0.0),
                COLORS[i % COLORS.len()],
                esc(name),
                esc(&p.series[i]),
                compact(v.median),
                esc(&p.unit),
                compact(v.min),
                compact(v.max)
            );
            let cx = bx + bar_w / 2.0;
            let mut label_y = y;
            if v.min.is_finite() && v.max.is_finite() && v.max > v.min {
                let (y1, y2) = (y_of(v.min), y_of(v.max));
                let _ = writeln!(
                    s,
                    r##"<path d="M{cx:.1} {y1:.1}V{y2:.1}M{:.1} {y1:.1}h6M{:.1} {y2:.1}h6" stroke="#222" fill="none"/>"##,
                    cx - 3.0,
                    cx - 3.0
                );
                label_y = label_y.min(y2);
            }
            let _ = writeln!(
                s,
                r##"<text x="{cx:.1}" y="{:.1}" font-size="9" text-anchor="middle" fill="#222">{}</text>"##,
                label_y - 3.0,
                compact(v.median)
            );
        }
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle">{}</text>"##,
            gx + GROUP_W / 2.0,
            TOP + PLOT_H + 18.0,
            esc(name)
        );
    }
    let _ = writeln!(s, "</g>");
}

/// A tick step of 1, 2 or 5 times a power of ten giving about five ticks,
/// and the axis top (a multiple of the step, at least `max`).
fn nice_axis(max: f64) -> (f64, f64) {
    if max <= 0.0 || !max.is_finite() {
        return (1.0, 1.0);
    }
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag);
    (step, (max / step).ceil().max(1.0) * step)
}

fn tick(v: f64, step: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if step >= 1000.0 {
        format!("{}k", v / 1000.0)
    } else if step >= 1.0 {
        format!("{v:.0}")
    } else {
        let d = (-step.log10().floor()) as usize;
        format!("{v:.d$}")
    }
}

/// Short labels: 12.3k, 456, 45.6, 4.56.
fn compact(v: f64) -> String {
    if !v.is_finite() {
        "-".into()
    } else if v >= 10_000.0 {
        format!("{:.1}k", v / 1000.0)
    } else if v >= 1000.0 {
        format!("{:.2}k", v / 1000.0)
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_steps_are_nice() {
        assert_eq!(nice_axis(23.0), (5.0, 25.0));
        assert_eq!(nice_axis(9.3), (2.0, 10.0));
        assert_eq!(nice_axis(14_500.0), (5000.0, 15_000.0));
        assert_eq!(compact(12_345.0), "12.3k");
        assert_eq!(compact(4.561), "4.56");
    }

    #[test]
    fn chart_is_well_formed() {
        let s = Summary { median: 2.0, min: 1.5, max: 2.5 };
        let p = Panel {
            title: "T <1>".into(),
            unit: "µs".into(),
            groups: vec!["a".into(), "b".into()],
            series: vec!["p50".into(), "p99".into()],
            values: vec![vec![s, s], vec![s, s]],
        };
        let svg = chart("x & y", &[p]);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("x &amp; y") && svg.contains("T &lt;1&gt;"));
        assert_eq!(svg.matches("<rect x=").count(), 2 + 4); // legend + bars
    }
}
