//! The coordinate-wise robust rules on one coordinate's values, shared by the CPU backend and
//! used as the definition the CUDA kernels are tested against.

use std::cmp::Ordering;

use super::Aggregation;

fn by_value(a: &f32, b: &f32) -> Ordering {
    a.total_cmp(b)
}

/// The median of `values` (finite, at least one), reordering them: the middle value, or the
/// mean of the two middle values (in f64, then rounded) for an even count.
pub fn column_median(values: &mut [f32]) -> f32 {
    let n = values.len();
    let (below, &mut upper, _) = values.select_nth_unstable_by(n / 2, by_value);
    if n % 2 == 1 {
        return upper;
    }
    let lower = below.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    ((f64::from(lower) + f64::from(upper)) / 2.0) as f32
}

/// The mean of `values` (finite, at least one) without the
/// [`Aggregation::trimmed_per_end`] smallest and largest, reordering them. The kept values
/// are summed in f64 in ascending order.
pub fn column_trimmed_mean(values: &mut [f32], trim: f64) -> f32 {
    let n = values.len();
    let k = Aggregation::trimmed_per_end(trim, n);
    let kept = if k == 0 {
        values
    } else {
        // The k smallest go before index k, the k largest after index n − k − 1.
        values.select_nth_unstable_by(k, by_value);
        let rest = &mut values[k..];
        rest.select_nth_unstable_by(n - 2 * k - 1, by_value);
        &mut rest[..n - 2 * k]
    };
    kept.sort_unstable_by(by_value);
    let sum: f64 = kept.iter().map(|&x| f64::from(x)).sum();
    (sum / kept.len() as f64) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(column_median(&mut [3.0]), 3.0);
        assert_eq!(column_median(&mut [5.0, -1.0, 2.0]), 2.0);
        assert_eq!(column_median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(column_median(&mut [1.0, 1.0, 9.0, 9.0]), 5.0);
    }

    #[test]
    fn trimmed_mean_cuts_each_end_and_keeps_one_value() {
        let mut v = [100.0, 1.0, 2.0, 3.0, -100.0];
        assert_eq!(column_trimmed_mean(&mut v, 0.2), 2.0);
        assert_eq!(column_trimmed_mean(&mut [1.0, 2.0, 6.0], 0.0), 3.0);
        // trim · n rounds down: 0.49 · 2 = 0 cut, both kept.
        assert_eq!(column_trimmed_mean(&mut [1.0, 2.0], 0.49), 1.5);
        // 0.45 · 10 = 4 cut from each end, 2 kept.
        let mut ten: Vec<f32> = (0..10).rev().map(|x| x as f32).collect();
        assert_eq!(column_trimmed_mean(&mut ten, 0.45), 4.5);
        assert_eq!(Aggregation::trimmed_per_end(0.49, 3), 1);
        assert_eq!(Aggregation::trimmed_per_end(0.49, 1), 0);
    }
}
