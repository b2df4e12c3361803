//! Real vectors in the ring Z/2³², where masks are added.
//!
//! A value is clipped to `[-clip, clip]`, scaled by `scale` and rounded to the nearest
//! integer, stored in two's complement. The scale is the largest for which the sum of
//! `max_terms` such values cannot leave the signed 32-bit range, so the sum decodes without
//! wrap-around: `scale = ⌊(2³¹ − 1) / (clip · max_terms)⌋`. Rounding adds at most `0.5 / scale`
//! to each value, so a mean of n inputs is off by at most `0.5 / scale` per element; clipping
//! changes only values beyond the range, which the encoder counts. With 1,000 inputs clipped
//! to ±1 that is 2.3·10⁻⁷, below f16's resolution near 1 (an int8 or f16 update decodes to
//! values the ring then carries with that error on top).

use crate::error::SecAggError;

/// A fixed-point code for sums of up to `max_terms` values in `[-clip, clip]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FixedPoint {
    clip: f64,
    scale: f64,
    /// The largest code magnitude: `⌊(2³¹ − 1) / max_terms⌋`. Rounding `clip · scale` to the
    /// nearest integer can overshoot it by one, and `max_terms` such codes would then wrap.
    limit: i64,
}

impl FixedPoint {
    /// The finest code whose sums of `max_terms` values cannot overflow.
    pub fn for_sum(clip: f64, max_terms: u32) -> Result<Self, SecAggError> {
        if !(clip.is_finite() && clip > 0.0) || max_terms == 0 {
            return Err(SecAggError::BadParams(format!(
                "fixed point for {max_terms} values clipped to ±{clip}"
            )));
        }
        let scale = (f64::from(i32::MAX) / (clip * f64::from(max_terms))).floor();
        if scale < 1.0 {
            return Err(SecAggError::BadParams(format!(
                "±{clip} × {max_terms} values leave no fixed-point resolution in 32 bits"
            )));
        }
        Ok(Self {
            clip,
            scale,
            limit: i64::from(i32::MAX) / i64::from(max_terms),
        })
    }

    /// The clipping bound.
    pub fn clip(&self) -> f64 {
        self.clip
    }

    /// Ring units per unit of value.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// The most rounding moves one value (and a mean of encoded values).
    pub fn max_rounding_error(&self) -> f64 {
        0.5 / self.scale
    }

    /// Appends the code of each value to `out`; returns how many were clipped. A NaN encodes
    /// as 0 and counts as clipped.
    pub fn encode(&self, values: impl IntoIterator<Item = f64>, out: &mut Vec<u32>) -> usize {
        let mut clipped = 0;
        for v in values {
            let c = if v.is_nan() {
                0.0
            } else {
                v.clamp(-self.clip, self.clip)
            };
            if c != v {
                clipped += 1;
            }
            let code = ((c * self.scale).round() as i64).clamp(-self.limit, self.limit);
            out.push((code as i32) as u32);
        }
        clipped
    }

    /// The real sum behind a ring sum of at most `max_terms` codes.
    pub fn decode_sum(&self, sum: &[u32]) -> Vec<f64> {
        sum.iter()
            .map(|&s| f64::from(s as i32) / self.scale)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_scale_leaves_room_for_every_term_at_the_bound() {
        let code = FixedPoint::for_sum(2.0, 1000).unwrap();
        let mut out = Vec::new();
        for _ in 0..1000 {
            code.encode([2.0, -2.0], &mut out);
        }
        let (mut hi, mut lo) = (0u32, 0u32);
        for pair in out.chunks(2) {
            hi = hi.wrapping_add(pair[0]);
            lo = lo.wrapping_add(pair[1]);
        }
        let sum = code.decode_sum(&[hi, lo]);
        assert!((sum[0] - 2000.0).abs() < 1e-3 && (sum[1] + 2000.0).abs() < 1e-3);
        assert!(FixedPoint::for_sum(1e9, 10).is_err());
        assert!(FixedPoint::for_sum(0.0, 10).is_err());
    }

    #[test]
    fn clipped_and_nan_values_are_counted() {
        let code = FixedPoint::for_sum(1.0, 10).unwrap();
        let mut out = Vec::new();
        assert_eq!(code.encode([0.5, 3.0, f64::NAN, -1.0], &mut out), 2);
        assert_eq!(code.decode_sum(&out)[1], 1.0);
        assert_eq!(code.decode_sum(&out)[2], 0.0);
    }

    proptest! {
        #[test]
        fn a_sum_of_codes_at_the_clip_never_wraps(clip in 0.01f64..100.0, terms in 1u32..2000) {
            let code = FixedPoint::for_sum(clip, terms).unwrap();
            let mut one = Vec::new();
            code.encode([clip, -clip], &mut one);
            let (hi, lo) = (i64::from(one[0] as i32), i64::from(one[1] as i32));
            prop_assert!(hi * i64::from(terms) <= i64::from(i32::MAX));
            prop_assert!(lo * i64::from(terms) >= -i64::from(i32::MAX));
            let (mut shi, mut slo) = (0u32, 0u32);
            for _ in 0..terms {
                shi = shi.wrapping_add(one[0]);
                slo = slo.wrapping_add(one[1]);
            }
            let sum = code.decode_sum(&[shi, slo]);
            prop_assert!(sum[0] > 0.0 && sum[1] < 0.0, "{sum:?}");
        }

        #[test]
        fn a_ring_sum_decodes_to_the_real_sum_within_the_rounding_bound(
            values in proptest::collection::vec(proptest::collection::vec(-1.0f64..1.0, 4), 1..50)
        ) {
            let code = FixedPoint::for_sum(1.0, 50).unwrap();
            let mut sum = [0u32; 4];
            for v in &values {
                let mut out = Vec::new();
                code.encode(v.iter().copied(), &mut out);
                for (s, o) in sum.iter_mut().zip(out) {
                    *s = s.wrapping_add(o);
                }
            }
            let decoded = code.decode_sum(&sum);
            for (j, d) in decoded.iter().enumerate() {
                let exact: f64 = values.iter().map(|v| v[j]).sum();
                let bound = values.len() as f64 * code.max_rounding_error() + 1e-12;
                prop_assert!((d - exact).abs() <= bound, "{d} vs {exact}");
            }
        }
    }
}
