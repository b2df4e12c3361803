//! The encodings' error bounds, on random heads and values over many magnitudes.

use proptest::prelude::*;
use protocol::{EncodedParams, Encoding, EncodingError, RowLayout};
use wsa::HeadSpec;

fn layout_and_values() -> impl Strategy<Value = (RowLayout, Vec<f32>)> {
    (
        1usize..40,
        prop::collection::vec(1usize..20, 0..3),
        1usize..12,
    )
        .prop_flat_map(|(input, hidden, classes)| {
            let layout = RowLayout::of_head(&HeadSpec {
                input,
                hidden,
                classes,
            });
            let n = layout.len();
            (
                Just(layout),
                prop::collection::vec(
                    (-1.0f32..1.0, -12i32..6).prop_map(|(m, e)| m * 2f32.powi(e)),
                    n,
                ),
            )
        })
}

proptest! {
    #[test]
    fn f32_is_exact((layout, values) in layout_and_values()) {
        let enc = EncodedParams::encode(&values, &layout, Encoding::F32).unwrap();
        prop_assert_eq!(enc.data.len(), 4 * values.len());
        prop_assert_eq!(enc.decode(&layout).unwrap(), values);
    }

    #[test]
    fn f16_within_half_an_ulp((layout, values) in layout_and_values()) {
        let enc = EncodedParams::encode(&values, &layout, Encoding::F16).unwrap();
        prop_assert_eq!(enc.data.len(), 2 * values.len());
        for (x, y) in values.iter().zip(enc.decode(&layout).unwrap()) {
            let bound = x.abs() * 2f32.powi(-11) + 2f32.powi(-25);
            prop_assert!((x - y).abs() <= bound, "{} -> {} (bound {})", x, y, bound);
        }
    }

    #[test]
    fn int8_within_half_a_step_of_its_row((layout, values) in layout_and_values()) {
        let enc = EncodedParams::encode(&values, &layout, Encoding::Int8RowScaled).unwrap();
        prop_assert_eq!(enc.data.len(), values.len());
        prop_assert_eq!(enc.scales.len(), layout.rows());
        let decoded = enc.decode(&layout).unwrap();
        // Rebuild the rows from the layout's definition independently of the encoder.
        let mut start = 0;
        for &scale in &enc.scales {
            let cols = row_len_at(&layout, start);
            let row = &values[start..start + cols];
            let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            prop_assert!((scale - max / 127.0).abs() <= f32::EPSILON * max);
            for (x, y) in row.iter().zip(&decoded[start..start + cols]) {
                // Half a quantization step, plus f32 rounding of the scale product.
                let bound = max / 254.0 * (1.0 + 1e-5);
                prop_assert!((x - y).abs() <= bound, "{} -> {} (bound {})", x, y, bound);
            }
            start += cols;
        }
        prop_assert_eq!(start, values.len());
    }
}

/// The row width at flat offset `start` for head layouts: found by encoding a probe.
fn row_len_at(layout: &RowLayout, start: usize) -> usize {
    // A vector that is 1 at `start` and 0 elsewhere quantizes to 127 at `start` and has a
    // non-zero scale only in its own row; the row ends where the next scale begins.
    let mut probe = vec![0f32; layout.len()];
    probe[start] = 1.0;
    let enc = EncodedParams::encode(&probe, layout, Encoding::Int8RowScaled).unwrap();
    let row = enc.scales.iter().position(|&s| s > 0.0).unwrap();
    // Row widths are recovered from a second probe per row boundary: width = distance to the
    // first offset whose probe lands in the next row.
    let mut end = start + 1;
    while end < layout.len() {
        let mut p = vec![0f32; layout.len()];
        p[end] = 1.0;
        let e = EncodedParams::encode(&p, layout, Encoding::Int8RowScaled).unwrap();
        if e.scales.iter().position(|&s| s > 0.0).unwrap() != row {
            break;
        }
        end += 1;
    }
    end - start
}

#[test]
fn head_layout_rows_follow_the_tensors() {
    let layout = RowLayout::of_head(&HeadSpec::mlp(1280, &[256], 10));
    assert_eq!(layout.len(), 1280 * 256 + 256 + 256 * 10 + 10);
    assert_eq!(layout.rows(), 1280 + 1 + 256 + 1);
    // Int8 payload against f32: the target is ≤ 26%.
    let values: Vec<f32> = (0..layout.len()).map(|i| (i as f32).sin()).collect();
    let f32b = EncodedParams::encode(&values, &layout, Encoding::F32).unwrap();
    let i8b = EncodedParams::encode(&values, &layout, Encoding::Int8RowScaled).unwrap();
    let ratio = i8b.payload_bytes() as f64 / f32b.payload_bytes() as f64;
    assert!(ratio <= 0.26, "int8 is {ratio:.4} of f32");
}

#[test]
fn encoder_refuses_what_it_cannot_represent() {
    let layout = RowLayout::uniform(4, 2);
    assert_eq!(
        EncodedParams::encode(&[1.0, f32::NAN, 0.0, 0.0], &layout, Encoding::Int8RowScaled),
        Err(EncodingError::NonFinite { index: 1 })
    );
    assert_eq!(
        EncodedParams::encode(&[1.0, 0.0, 7e4, 0.0], &layout, Encoding::F16),
        Err(EncodingError::OutOfRange {
            index: 2,
            value: 7e4
        })
    );
    assert!(matches!(
        EncodedParams::encode(&[1.0; 3], &layout, Encoding::F32),
        Err(EncodingError::Length { .. })
    ));
    // An all-zero row has scale 0 and decodes to zeros.
    let zeros = EncodedParams::encode(&[0.0; 4], &layout, Encoding::Int8RowScaled).unwrap();
    assert_eq!(zeros.decode(&layout).unwrap(), vec![0.0; 4]);
}

#[test]
fn decoder_checks_lengths_and_scales() {
    let layout = RowLayout::uniform(4, 2);
    let good =
        EncodedParams::encode(&[1.0, -2.0, 3.0, 4.0], &layout, Encoding::Int8RowScaled).unwrap();
    let mut short = good.clone();
    short.data.pop();
    assert!(matches!(
        short.decode(&layout),
        Err(EncodingError::DataBytes { .. })
    ));
    let mut scales = good.clone();
    scales.scales.push(1.0);
    assert!(matches!(
        scales.decode(&layout),
        Err(EncodingError::Scales { .. })
    ));
    let mut nan = good.clone();
    nan.scales[1] = f32::NAN;
    assert_eq!(nan.decode(&layout), Err(EncodingError::BadScale { row: 1 }));
    let mut neg = good.clone();
    neg.scales[0] = -1.0;
    assert_eq!(neg.decode(&layout), Err(EncodingError::BadScale { row: 0 }));
    let mut count = good;
    count.count = 5;
    assert!(matches!(
        count.decode(&layout),
        Err(EncodingError::Length { .. })
    ));
}

/// A shape may claim more values than memory (or `usize`) holds; decoding against it is a
/// length error, decided before any output is allocated. (The fuzz target found a 2 GB
/// allocation here; with these dimensions the old code aborted on capacity overflow.) Such a
/// spec fails `HeadSpec::validate`, but its layout must still be safe to ask for.
#[test]
fn a_shape_claiming_more_than_memory_is_a_length_error() {
    let huge = u32::MAX as usize;
    let spec = HeadSpec {
        input: huge,
        hidden: vec![huge, huge],
        classes: huge,
    };
    assert!(spec.validate().is_err());
    let layout = RowLayout::of_head(&spec);
    assert_eq!(layout.len(), usize::MAX, "the length saturates");
    for encoding in [Encoding::F32, Encoding::F16, Encoding::Int8RowScaled] {
        let params = EncodedParams {
            encoding,
            count: 2,
            data: vec![0; 8],
            scales: vec![],
        };
        assert!(matches!(
            params.decode(&layout),
            Err(EncodingError::Length { .. })
        ));
    }
}
