//! Parameter encodings: f32 as is, f16, and int8 with one scale per row.
//!
//! Rows follow the head's tensors ([`RowLayout`]): each weight matrix `[in, out]` contributes
//! `in` rows of `out` values, each bias one row. Per-row int8 keeps one outlier from
//! flattening a whole tensor's resolution. Error bounds, tested in `tests/encoding.rs`:
//! f32 exact; f16 `|x̂ − x| ≤ 2⁻¹¹·|x| + 2⁻²⁵` for `|x| ≤ 65504` (larger is refused);
//! int8 `|x̂ − x| ≤ max|row| / 254`.

use std::fmt;
use std::str::FromStr;

use half::f16;
use half::slice::HalfFloatSliceExt;
use serde::{Deserialize, Serialize};
use wsa::HeadSpec;

/// A parameter vector that cannot be encoded or decoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EncodingError {
    /// The value count does not match the layout.
    #[error("expected {expected} values, got {got}")]
    Length {
        /// From the layout.
        expected: usize,
        /// Given.
        got: usize,
    },
    /// The data bytes do not match the count and encoding.
    #[error("expected {expected} data bytes, got {got}")]
    DataBytes {
        /// From count and encoding.
        expected: usize,
        /// Given.
        got: usize,
    },
    /// The number of int8 scales does not match the rows.
    #[error("expected {expected} scales, got {got}")]
    Scales {
        /// Rows of the layout.
        expected: usize,
        /// Given.
        got: usize,
    },
    /// An int8 scale is negative or non-finite.
    #[error("bad scale in row {row}")]
    BadScale {
        /// The row.
        row: usize,
    },
    /// A value to encode is NaN or infinite.
    #[error("value {index} is not finite")]
    NonFinite {
        /// Its index.
        index: usize,
    },
    /// A value does not fit the encoding (f16 above 65504).
    #[error("value {value} at {index} does not fit the encoding")]
    OutOfRange {
        /// Its index.
        index: usize,
        /// The value.
        value: f32,
    },
}

/// How a parameter vector is put on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Encoding {
    /// 4 bytes per value, exact.
    #[default]
    F32,
    /// 2 bytes per value, IEEE half precision.
    F16,
    /// 1 byte per value plus one f32 scale per row.
    Int8RowScaled,
}

impl fmt::Display for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Encoding::F32 => "f32",
            Encoding::F16 => "f16",
            Encoding::Int8RowScaled => "int8",
        })
    }
}

impl FromStr for Encoding {
    type Err = String;

    /// `f32`, `f16` or `int8` (also `int8-row-scaled`, the config files' spelling).
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "f32" => Ok(Encoding::F32),
            "f16" => Ok(Encoding::F16),
            "int8" | "int8-row-scaled" => Ok(Encoding::Int8RowScaled),
            other => Err(format!("unknown encoding {other:?}: f32, f16 or int8")),
        }
    }
}

impl Encoding {
    /// Bytes per value, scales not counted.
    pub fn value_bytes(self) -> usize {
        match self {
            Encoding::F32 => 4,
            Encoding::F16 => 2,
            Encoding::Int8RowScaled => 1,
        }
    }
}

/// How a flat parameter vector splits into rows: `(rows, cols)` segments in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowLayout {
    segments: Vec<(usize, usize)>,
}

impl RowLayout {
    /// The rows of a head's flat vector ([`HeadSpec::flat_layout`]): each weight matrix
    /// `[in, out]` gives `in` rows of `out` values, each bias one row.
    pub fn of_head(spec: &HeadSpec) -> Self {
        Self {
            segments: spec
                .flat_layout()
                .iter()
                .map(|t| (t.rows, t.cols))
                .collect(),
        }
    }

    /// One segment of `len` values in rows of `cols` (the last row may be shorter).
    pub fn uniform(len: usize, cols: usize) -> Self {
        let cols = cols.max(1);
        let mut segments = vec![(len / cols, cols)];
        if !len.is_multiple_of(cols) {
            segments.push((1, len % cols));
        }
        Self { segments }
    }

    /// Total values. Saturating: a shape from the wire may claim more than `usize` holds,
    /// and a saturated length then matches no real count.
    pub fn len(&self) -> usize {
        self.segments
            .iter()
            .fold(0usize, |n, &(r, c)| n.saturating_add(r.saturating_mul(c)))
    }

    /// True when there are no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Total rows (the number of int8 scales).
    pub fn rows(&self) -> usize {
        self.segments
            .iter()
            .fold(0usize, |n, &(r, _)| n.saturating_add(r))
    }

    fn row_slices(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.segments
            .iter()
            .flat_map(|&(rows, cols)| std::iter::repeat_n(cols, rows))
            .scan(0usize, |start, cols| {
                let s = *start;
                *start += cols;
                Some((s, cols))
            })
    }
}

/// An encoded parameter vector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EncodedParams {
    /// How `data` is to be read.
    pub encoding: Encoding,
    /// Number of values.
    pub count: u32,
    /// `count · value_bytes` bytes, little-endian.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    /// One scale per row for int8; empty otherwise.
    pub scales: Vec<f32>,
}

impl EncodedParams {
    /// Encodes `values` laid out as `layout`.
    pub fn encode(
        values: &[f32],
        layout: &RowLayout,
        encoding: Encoding,
    ) -> Result<Self, EncodingError> {
        if values.len() != layout.len() {
            return Err(EncodingError::Length {
                expected: layout.len(),
                got: values.len(),
            });
        }
        let count = u32::try_from(values.len()).map_err(|_| EncodingError::Length {
            expected: u32::MAX as usize,
            got: values.len(),
        })?;
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(EncodingError::NonFinite { index: i });
        }
        let (data, scales) = match encoding {
            Encoding::F32 => {
                let mut data = Vec::with_capacity(values.len() * 4);
                for v in values {
                    data.extend_from_slice(&v.to_le_bytes());
                }
                (data, Vec::new())
            }
            Encoding::F16 => {
                if let Some(i) = values.iter().position(|v| v.abs() > f16::MAX.to_f32()) {
                    return Err(EncodingError::OutOfRange {
                        index: i,
                        value: values[i],
                    });
                }
                let mut halves = vec![f16::ZERO; values.len()];
                halves.convert_from_f32_slice(values);
                let mut data = Vec::with_capacity(values.len() * 2);
                for h in halves {
                    data.extend_from_slice(&h.to_le_bytes());
                }
                (data, Vec::new())
            }
            Encoding::Int8RowScaled => {
                let mut data = vec![0u8; values.len()];
                let mut scales = Vec::with_capacity(layout.rows());
                for (start, cols) in layout.row_slices() {
                    let row = &values[start..start + cols];
                    let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let scale = max / 127.0;
                    scales.push(scale);
                    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                    for (q, v) in data[start..start + cols].iter_mut().zip(row) {
                        *q = ((v * inv).round().clamp(-127.0, 127.0) as i8) as u8;
                    }
                }
                (data, scales)
            }
        };
        Ok(Self {
            encoding,
            count,
            data,
            scales,
        })
    }

    /// Decodes into f32 values, checking every length against `layout` first. The output is
    /// allocated only after the checks: a layout from the same untrusted message may claim
    /// billions of values that the bytes do not hold (found by the `decode_frame` fuzz target).
    pub fn decode(&self, layout: &RowLayout) -> Result<Vec<f32>, EncodingError> {
        self.check_lengths(layout)?;
        let mut out = vec![0f32; layout.len()];
        self.decode_into(layout, &mut out)?;
        Ok(out)
    }

    /// `base` plus these values decoded: the head a task that is a change from `base` gives.
    /// The one rule both sides follow, so the client and the aggregator hold the same bits
    /// (f32 addition is exactly rounded and commutes on every platform).
    pub fn add_to(&self, base: &[f32], layout: &RowLayout) -> Result<Vec<f32>, EncodingError> {
        if base.len() != layout.len() {
            return Err(EncodingError::Length {
                expected: layout.len(),
                got: base.len(),
            });
        }
        let mut out = self.decode(layout)?;
        for (o, &b) in out.iter_mut().zip(base) {
            *o += b;
        }
        Ok(out)
    }

    /// Decodes into `out` (of `layout.len()` values).
    pub fn decode_into(&self, layout: &RowLayout, out: &mut [f32]) -> Result<(), EncodingError> {
        if out.len() != layout.len() {
            return Err(EncodingError::Length {
                expected: layout.len(),
                got: out.len(),
            });
        }
        self.check_lengths(layout)?;
        self.decode_checked(layout, out)
    }

    /// The value count, the data bytes and the scales against `layout`.
    fn check_lengths(&self, layout: &RowLayout) -> Result<(), EncodingError> {
        let n = layout.len();
        if self.count as usize != n {
            return Err(EncodingError::Length {
                expected: n,
                got: self.count as usize,
            });
        }
        let want_bytes = n.saturating_mul(self.encoding.value_bytes());
        if self.data.len() != want_bytes {
            return Err(EncodingError::DataBytes {
                expected: want_bytes,
                got: self.data.len(),
            });
        }
        let want_scales = match self.encoding {
            Encoding::Int8RowScaled => layout.rows(),
            _ => 0,
        };
        if self.scales.len() != want_scales {
            return Err(EncodingError::Scales {
                expected: want_scales,
                got: self.scales.len(),
            });
        }
        Ok(())
    }

    /// Decodes into `out` once `check_lengths` has passed.
    fn decode_checked(&self, layout: &RowLayout, out: &mut [f32]) -> Result<(), EncodingError> {
        match self.encoding {
            Encoding::F32 => {
                for (o, b) in out.iter_mut().zip(self.data.chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            Encoding::F16 => {
                // Through a small aligned buffer: the bytes are not 2-aligned, and half's
                // slice conversion uses the CPU's f16 instructions where there are any.
                let mut halves = [f16::ZERO; 512];
                for (o, b) in out.chunks_mut(512).zip(self.data.chunks(1024)) {
                    let h = &mut halves[..o.len()];
                    for (h, b) in h.iter_mut().zip(b.chunks_exact(2)) {
                        *h = f16::from_le_bytes([b[0], b[1]]);
                    }
                    h.convert_to_f32_slice(o);
                }
            }
            Encoding::Int8RowScaled => {
                if let Some(i) = self
                    .scales
                    .iter()
                    .position(|s| !(s.is_finite() && *s >= 0.0))
                {
                    return Err(EncodingError::BadScale { row: i });
                }
                for ((start, cols), &scale) in layout.row_slices().zip(&self.scales) {
                    let q = &self.data[start..start + cols];
                    for (o, &b) in out[start..start + cols].iter_mut().zip(q) {
                        *o = f32::from(b as i8) * scale;
                    }
                }
            }
        }
        Ok(())
    }

    /// Bytes of payload (values and scales), as counted for bandwidth figures.
    pub fn payload_bytes(&self) -> usize {
        self.data.len() + 4 * self.scales.len()
    }
}
