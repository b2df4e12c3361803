//! Turns a decoded image into the backbone's input: RGB (grey copied to three channels),
//! bilinear resize to `side × side`, scaled to [0, 1], normalised with the ImageNet mean and
//! std, laid out NCHW. Pure and allocation-light, so it is tested on exact values.

use datasets::Image;

use crate::error::BackboneError;

pub use wsa::saved::{IMAGENET_MEAN, IMAGENET_STD};

/// Identifies this exact preprocessing in feature-cache headers: bump it whenever the output
/// of [`preprocess_into`] changes for any input, so old caches are rebuilt.
pub const PREPROCESSING_ID: u32 = 1;

/// One axis of a bilinear resize with half-pixel centres (`align_corners = false`, no
/// antialiasing; what `torch.nn.functional.interpolate(mode="bilinear")` does): for every
/// output index, the two source indices and the weight of the second.
fn axis_taps(src: usize, dst: usize) -> Vec<(usize, usize, f32)> {
    let scale = src as f64 / dst as f64;
    (0..dst)
        .map(|o| {
            let s = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
            let i0 = (s.floor() as usize).min(src - 1);
            let i1 = (i0 + 1).min(src - 1);
            (i0, i1, (s - i0 as f64) as f32)
        })
        .collect()
}

/// Writes the `3 × side × side` NCHW input for `image` into `out`.
pub fn preprocess_into(image: &Image, side: usize, out: &mut [f32]) -> Result<(), BackboneError> {
    let (w, h, c) = (
        image.width as usize,
        image.height as usize,
        image.channels as usize,
    );
    let invalid = |reason: String| Err(BackboneError::InvalidImage { reason });
    if !(c == 1 || c == 3) {
        return invalid(format!("{c} channels; expected 1 (grey) or 3 (RGB)"));
    }
    if w == 0 || h == 0 || image.pixels.len() != w * h * c {
        return invalid(format!(
            "{w}×{h}×{c} image with {} pixel bytes",
            image.pixels.len()
        ));
    }
    if side == 0 || out.len() != 3 * side * side {
        return invalid(format!("output of {} floats for side {side}", out.len()));
    }
    let xs = axis_taps(w, side);
    let ys = axis_taps(h, side);
    let plane = side * side;
    for (oy, &(y0, y1, fy)) in ys.iter().enumerate() {
        for (ox, &(x0, x1, fx)) in xs.iter().enumerate() {
            for ch in 0..3 {
                let src_ch = if c == 1 { 0 } else { ch };
                let px = |x: usize, y: usize| f32::from(image.pixels[(y * w + x) * c + src_ch]);
                let top = px(x0, y0) + fx * (px(x1, y0) - px(x0, y0));
                let bottom = px(x0, y1) + fx * (px(x1, y1) - px(x0, y1));
                let v = (top + fy * (bottom - top)) / 255.0;
                out[ch * plane + oy * side + ox] = (v - IMAGENET_MEAN[ch]) / IMAGENET_STD[ch];
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(width: u32, height: u32, channels: u8, pixels: Vec<u8>) -> Image {
        Image {
            width,
            height,
            channels,
            pixels,
        }
    }

    fn unnormalise(out: &[f32], side: usize) -> Vec<[f32; 3]> {
        (0..side * side)
            .map(|i| {
                let mut px = [0.0; 3];
                for ch in 0..3 {
                    px[ch] =
                        (out[ch * side * side + i] * IMAGENET_STD[ch] + IMAGENET_MEAN[ch]) * 255.0;
                }
                px
            })
            .collect()
    }

    #[test]
    fn inconsistent_images_are_typed_errors() {
        let mut out = vec![0.0; 12];
        for bad in [
            image(2, 2, 2, vec![0; 8]),
            image(2, 2, 3, vec![0; 11]),
            image(0, 2, 1, vec![]),
        ] {
            assert!(matches!(
                preprocess_into(&bad, 2, &mut out),
                Err(BackboneError::InvalidImage { .. })
            ));
        }
        assert!(preprocess_into(&image(2, 2, 1, vec![0; 4]), 3, &mut out).is_err());
    }

    #[test]
    fn same_size_rgb_is_only_normalised() {
        let pixels: Vec<u8> = (0..2 * 2 * 3).map(|i| (i * 20) as u8).collect();
        let mut out = vec![0.0; 12];
        preprocess_into(&image(2, 2, 3, pixels.clone()), 2, &mut out).unwrap();
        for (i, px) in unnormalise(&out, 2).iter().enumerate() {
            for ch in 0..3 {
                assert!((px[ch] - f32::from(pixels[i * 3 + ch])).abs() < 1e-3);
            }
        }
    }

    #[test]
    fn grey_is_copied_to_three_channels_and_constants_stay_constant() {
        let mut out = vec![0.0; 3 * 5 * 5];
        preprocess_into(&image(3, 3, 1, vec![77; 9]), 5, &mut out).unwrap();
        for px in unnormalise(&out, 5) {
            assert!(px.iter().all(|v| (v - 77.0).abs() < 1e-3), "{px:?}");
        }
    }

    #[test]
    fn upsampling_matches_half_pixel_bilinear() {
        // 2 → 4 along x with half-pixel centres samples the source at -0.25 (clamped to 0),
        // 0.25, 0.75, 1.25 (clamped to the last pixel): 0, 25, 75, 100 for a ramp 0 → 100.
        let mut out = vec![0.0; 3 * 16];
        preprocess_into(&image(2, 1, 1, vec![0, 100]), 4, &mut out).unwrap();
        let row: Vec<f32> = unnormalise(&out, 4)[..4].iter().map(|p| p[0]).collect();
        for (got, want) in row.iter().zip([0.0, 25.0, 75.0, 100.0]) {
            assert!((got - want).abs() < 1e-3, "{row:?}");
        }
    }

    #[test]
    fn downsampling_by_two_averages_pixel_pairs() {
        let mut out = vec![0.0; 3 * 4];
        let pixels = vec![
            0, 100, 200, 40, 0, 100, 200, 40, 0, 100, 200, 40, 0, 100, 200, 40,
        ];
        preprocess_into(&image(4, 4, 1, pixels), 2, &mut out).unwrap();
        let px: Vec<f32> = unnormalise(&out, 2).iter().map(|p| p[0]).collect();
        for (got, want) in px.iter().zip([50.0, 120.0, 50.0, 120.0]) {
            assert!((got - want).abs() < 1e-3, "{px:?}");
        }
    }
}
