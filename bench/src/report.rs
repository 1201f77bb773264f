//! Collects the measurements of every repetition and prints the results table.

use std::collections::HashMap;
use std::fmt::Write as _;

use crate::cases::{Measurement, Reading, Row, Target, Unit};

#[derive(Debug, Default)]
pub(crate) struct Report {
    /// Rows in the order they were first measured.
    rows: Vec<Row>,
    /// Per repetition: row id -> outcome.
    reps: Vec<HashMap<String, Reading>>,
}

impl Report {
    pub(crate) fn add(&mut self, rep: usize, measurements: Vec<Measurement>) {
        while self.reps.len() < rep {
            self.reps.push(HashMap::new());
        }
        for Measurement { row, outcome } in measurements {
            if !self.rows.iter().any(|r| r.id == row.id) {
                self.rows.push(row.clone());
            }
            self.reps[rep - 1].insert(row.id, outcome);
        }
    }

    fn values(&self, id: &str) -> Vec<f64> {
        self.reps
            .iter()
            .filter_map(|rep| match rep.get(id) {
                Some(Reading::Value(v)) => Some(*v),
                _ => None,
            })
            .collect()
    }

    /// `id / reference` in each repetition that has both, so slow drift of the machine
    /// cancels out.
    fn ratios(&self, id: &str, reference: &str) -> Vec<f64> {
        self.reps
            .iter()
            .filter_map(|rep| match (rep.get(id), rep.get(reference)) {
                (Some(Reading::Value(v)), Some(Reading::Value(r))) if *r > 0.0 => Some(v / r),
                _ => None,
            })
            .collect()
    }

    /// The median of the per-repetition ratios.
    fn ratio(&self, id: &str, reference: &str) -> Option<f64> {
        median(&self.ratios(id, reference))
    }

    /// The results as a Markdown table.
    pub(crate) fn table(&self) -> String {
        let mut out = String::new();
        out.push_str("| case | what | median | min – max | ratio (min–max) | target |\n");
        out.push_str("|---|---|---:|---:|---:|---|\n");
        for row in &self.rows {
            let values = self.values(&row.id);
            let (median_text, range_text) = match median(&values) {
                Some(m) => (
                    format_value(m, row.unit),
                    format!(
                        "{} – {}",
                        format_value(min(&values), row.unit),
                        format_value(max(&values), row.unit)
                    ),
                ),
                None => ("failed".to_owned(), String::new()),
            };
            let ratio = row
                .reference
                .as_deref()
                .and_then(|reference| Some((reference, self.ratio(&row.id, reference)?)));
            let ratio_text = match ratio {
                Some((reference, r)) => {
                    let ratios = self.ratios(&row.id, reference);
                    if ratios.len() > 1 {
                        format!(
                            "{r:.2}x {reference} ({:.2}–{:.2})",
                            min(&ratios),
                            max(&ratios)
                        )
                    } else {
                        format!("{r:.2}x {reference}")
                    }
                }
                None => String::new(),
            };
            let target_text = row
                .target
                .map(|target| {
                    let verdict = match target {
                        Target::RatioAtLeast(goal) => ratio.map(|(_, r)| r >= goal),
                        Target::RatioAtMost(goal) => ratio.map(|(_, r)| r <= goal),
                        Target::AtMost(goal) => median(&values).map(|m| m <= goal),
                    };
                    let verdict = match verdict {
                        Some(true) => "met",
                        Some(false) => "missed",
                        None => "n/a",
                    };
                    format!("{}: {verdict}", format_target(target, row.unit))
                })
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "| {} | {} | {median_text} | {range_text} | {ratio_text} | {target_text} |",
                row.id, row.what
            );
        }
        out
    }
}

pub(crate) fn format_value(value: f64, unit: Unit) -> String {
    match unit {
        Unit::EntriesPerSec if value >= 1_000.0 => format!("{:.1}k/s", value / 1_000.0),
        Unit::EntriesPerSec => format!("{value:.0}/s"),
        Unit::Micros if value >= 1_000.0 => format!("{:.2} ms", value / 1_000.0),
        Unit::Micros => format!("{value:.0} µs"),
        Unit::MiB => format!("{value:.1} MiB"),
        Unit::Entries => format!("{value:.0}"),
    }
}

fn format_target(target: Target, unit: Unit) -> String {
    match target {
        Target::RatioAtLeast(goal) => format!("≥ {goal:.2}x"),
        Target::RatioAtMost(goal) => format!("≤ {goal:.2}x"),
        Target::AtMost(goal) => format!("≤ {}", format_value(goal, unit)),
    }
}

pub(crate) fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

fn min(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

/// The nearest-rank `p`-th percentile (`p` in 0..=100) of sorted values.
pub(crate) fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    // The epsilon keeps 99.9% of 1000 at rank 999 despite 99.9 not being exact in binary.
    let rank = (p / 100.0 * sorted.len() as f64 - 1e-9).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measurement(id: &str, unit: Unit, value: f64) -> Measurement {
        Measurement {
            row: Row::new(id, id, unit),
            outcome: Reading::Value(value),
        }
    }

    #[test]
    fn medians_and_percentiles() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        let sorted: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&sorted, 50.0), Some(500));
        assert_eq!(percentile(&sorted, 99.0), Some(990));
        assert_eq!(percentile(&sorted, 99.9), Some(999));
        assert_eq!(percentile(&sorted, 100.0), Some(1000));
        assert_eq!(percentile(&[7], 99.9), Some(7));
    }

    #[test]
    fn ratios_pair_values_of_the_same_repetition() {
        let mut report = Report::default();
        let consume = |v| Measurement {
            row: Row::new("consume", "c", Unit::EntriesPerSec)
                .vs("baseline")
                .target(Target::RatioAtLeast(1.3)),
            outcome: Reading::Value(v),
        };
        report.add(
            1,
            vec![
                measurement("baseline", Unit::EntriesPerSec, 100.0),
                consume(150.0),
            ],
        );
        report.add(
            2,
            vec![
                measurement("baseline", Unit::EntriesPerSec, 200.0),
                consume(220.0),
            ],
        );
        report.add(
            3,
            vec![
                measurement("baseline", Unit::EntriesPerSec, 100.0),
                consume(140.0),
            ],
        );
        // Ratios 1.5, 1.1, 1.4: the median is 1.4 (the ratio of medians would be 1.5).
        assert_eq!(report.ratio("consume", "baseline"), Some(1.4));
        let table = report.table();
        assert!(
            table.contains(
                "| consume | c | 150/s | 140/s – 220/s | 1.40x baseline (1.10–1.50) | ≥ 1.30x: met |"
            ),
            "{table}"
        );
    }

    #[test]
    fn values_print_in_their_units() {
        assert_eq!(format_value(88_123.0, Unit::EntriesPerSec), "88.1k/s");
        assert_eq!(format_value(212.4, Unit::Micros), "212 µs");
        assert_eq!(format_value(1_520.0, Unit::Micros), "1.52 ms");
        assert_eq!(format_value(9.56, Unit::MiB), "9.6 MiB");
    }
}
