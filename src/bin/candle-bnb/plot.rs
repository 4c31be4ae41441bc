//! `--plot`: a stacked bar per optimizer (weights, master copy, gradients, optimizer state,
//! activations) with the budget as a line, as a PNG.

use std::path::Path;

use candle_core::Result;
use plotters::prelude::*;

use crate::report::{gib_of as gib, Report};

/// The font of every label, shipped with the repository so no system font is needed.
static FONT: &[u8] = include_bytes!("../../../examples/llama_lora/assets/DejaVuSansMono.ttf");

/// The bytes of one part of a row's plan.
type Part = fn(&crate::report::Row) -> u64;

/// Draws `report`'s rows into the PNG `path`.
pub fn draw(report: &Report, path: &Path) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| {
        candle_core::Error::Msg(format!("--plot {}: cannot draw: {e}", path.display()))
    };
    // Registering twice is harmless.
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| err(&"the bundled font"))?;
    let rows = &report.rows;
    let top = rows
        .iter()
        .map(|r| gib(r.plan.total()))
        .chain(report.budget.map(gib))
        .fold(0f64, f64::max)
        .max(1e-3)
        // Room above the tallest bar for the legend.
        * 1.45;
    let width = (160 + 84 * rows.len() as u32).max(640);
    let root = BitMapBackend::new(path, (width, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let n = rows.len();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("training memory: {}", report.model),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((0..n).into_segmented(), 0f64..top)
        .map_err(|e| err(&e))?;
    let names: Vec<String> = rows.iter().map(|r| r.label()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_style(("sans-serif", 12))
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => {
                names.get(*i).map_or(String::new(), |name| name.to_string())
            }
            SegmentValue::Last => String::new(),
        })
        .y_desc("GiB")
        .draw()
        .map_err(|e| err(&e))?;
    let parts: [(&str, RGBColor, Part); 5] = [
        ("weights", RGBColor(90, 110, 150), |r| {
            r.plan.frozen_weights + r.plan.trainable_weights
        }),
        ("master copy", RGBColor(150, 170, 210), |r| {
            r.plan.master_weights
        }),
        ("gradients", RGBColor(230, 160, 60), |r| r.plan.gradients),
        ("optimizer state", RGBColor(200, 70, 70), |r| {
            r.plan.optimizer_state
        }),
        ("activations", RGBColor(120, 180, 120), |r| {
            r.plan.activations
        }),
    ];
    let mut base = vec![0f64; n];
    for (label, colour, part) in parts {
        let bottom = base.clone();
        for (b, r) in base.iter_mut().zip(rows) {
            *b += gib(part(r));
        }
        let heights = base.clone();
        chart
            .draw_series(
                Histogram::vertical(&chart)
                    .style(colour.filled())
                    .margin(8)
                    .baseline_func(move |i: &SegmentValue<usize>| match i {
                        SegmentValue::Exact(i) | SegmentValue::CenterOf(i) => {
                            bottom.get(*i).copied().unwrap_or(0.0)
                        }
                        SegmentValue::Last => 0.0,
                    })
                    .data(heights.into_iter().enumerate()),
            )
            .map_err(|e| err(&e))?
            .label(label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], colour.filled()));
    }
    if let Some(budget) = report.budget {
        let y = gib(budget);
        chart
            .draw_series(LineSeries::new(
                [(SegmentValue::Exact(0), y), (SegmentValue::Last, y)],
                BLACK.stroke_width(2),
            ))
            .map_err(|e| err(&e))?
            .label("budget")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 12, y)], BLACK.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}
