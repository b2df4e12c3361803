//! The feature cache: the backbone is frozen, so each image's features are computed once and
//! kept in a file per data set.
//!
//! Layout (all little-endian), 136-byte header then payload:
//!
//! | offset | field |
//! |---|---|
//! | 0 | magic `WSAFEAT\0` |
//! | 8 | format version (u32) |
//! | 12 | preprocessing id (u32) |
//! | 16 | input side (u32) |
//! | 20 | feature width `dim` (u32) |
//! | 24 | classes (u32) |
//! | 28 | reserved, 0 (u32) |
//! | 32 | rows `count` (u64) |
//! | 40 | sha256 of the backbone model file |
//! | 72 | sha256 of the source images and labels |
//! | 104 | sha256 of the payload |
//! | 136 | payload: `count` labels (u32), then `count × dim` features (f32, row-major) |
//!
//! A cache is used only when every header field matches what the caller would compute now and
//! the payload hashes to the recorded digest; otherwise it is reported and rebuilt. Files are
//! written to a temporary name, synced, then renamed, so a crash never leaves a half cache
//! under the real name.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use datasets::ImageSet;
use ndarray::Array2;
use sha2::{Digest, Sha256};
use thiserror::Error;
use wsa::LabelledFeatures;

/// The first bytes of every cache file.
pub const MAGIC: [u8; 8] = *b"WSAFEAT\0";
/// Version of the layout above.
pub const FORMAT_VERSION: u32 = 1;
const HEADER_LEN: usize = 136;
/// Largest payload accepted, in f32 features (4 GiB): checked before anything is allocated.
pub const MAX_FEATURES: u64 = 1 << 30;
/// Largest feature width accepted.
pub const MAX_DIM: u32 = 1 << 16;
const CHUNK: usize = 1 << 20;

/// What a cache must have been built from to be reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheKey {
    /// sha256 of the backbone model file.
    pub backbone_sha256: [u8; 32],
    /// Input side the backbone ran at.
    pub side: u32,
    /// [`crate::preprocess::PREPROCESSING_ID`] at build time.
    pub preprocessing: u32,
    /// [`digest_images`] of the source.
    pub source_digest: [u8; 32],
}

/// Why a cache file was not used.
#[derive(Debug, Error)]
pub enum CacheError {
    /// Reading or writing failed.
    #[error("feature cache {path}: {source}")]
    Io {
        /// The cache path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a feature cache.
    #[error("feature cache {path}: not a feature cache (bad magic)")]
    BadMagic {
        /// The cache path.
        path: PathBuf,
    },
    /// Written by another version of the layout.
    #[error("feature cache {path}: format version {found}, this build reads {FORMAT_VERSION}")]
    UnsupportedVersion {
        /// The cache path.
        path: PathBuf,
        /// The version found.
        found: u32,
    },
    /// Built from another backbone, input size, preprocessing or source data.
    #[error("feature cache {path}: stale ({field} differs)")]
    Stale {
        /// The cache path.
        path: PathBuf,
        /// The header field that differs.
        field: &'static str,
    },
    /// Header values out of bounds.
    #[error("feature cache {path}: header out of bounds ({reason})")]
    OutOfBounds {
        /// The cache path.
        path: PathBuf,
        /// Which bound.
        reason: String,
    },
    /// File length disagrees with the header.
    #[error("feature cache {path}: {found} bytes, header implies {expected}")]
    Truncated {
        /// The cache path.
        path: PathBuf,
        /// Length the header implies.
        expected: u64,
        /// Length on disk.
        found: u64,
    },
    /// The payload does not hash to the recorded digest.
    #[error("feature cache {path}: payload checksum mismatch (corrupt)")]
    Corrupt {
        /// The cache path.
        path: PathBuf,
    },
    /// The payload decodes to invalid features (labels out of range, non-finite values).
    #[error("feature cache {path}: {source}")]
    Invalid {
        /// The cache path.
        path: PathBuf,
        /// What the core rejected.
        source: wsa::Error,
    },
}

/// Where a data set's features live under `dir`: named by the data set, its split, the input
/// side, the row count and the backbone (the first 6 bytes of its sha256 in hex), so the
/// caches of two backbones sit side by side instead of each rebuilding over the other.
pub fn cache_path(
    dir: &Path,
    dataset: &str,
    split: &str,
    side: usize,
    rows: usize,
    backbone_sha256: &[u8; 32],
) -> PathBuf {
    let backbone = hex::encode(&backbone_sha256[..6]);
    dir.join(format!("{dataset}-{split}-{side}-{rows}-{backbone}.feat"))
}

/// sha256 over every image's size, channels and pixels and every label, in order: two data
/// sets with the same digest give the same features under the same backbone.
pub fn digest_images(set: &ImageSet) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update((set.images.len() as u64).to_le_bytes());
    for (image, label) in set.images.iter().zip(&set.labels) {
        h.update(image.width.to_le_bytes());
        h.update(image.height.to_le_bytes());
        h.update([image.channels]);
        h.update(&image.pixels);
        h.update(label.to_le_bytes());
    }
    h.finalize().into()
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes `features` under `key`, atomically ([`support::fs::AtomicFile`]).
pub fn write_cache(
    path: &Path,
    key: &CacheKey,
    features: &LabelledFeatures,
) -> Result<(), CacheError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let mut file = support::fs::AtomicFile::create(path).map_err(io(path))?;
    let tmp = file.temporary().to_owned();
    {
        let mut w = BufWriter::with_capacity(CHUNK, file.file().map_err(io(&tmp))?);
        let mut header = [0u8; HEADER_LEN];
        header[..8].copy_from_slice(&MAGIC);
        header[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        header[12..16].copy_from_slice(&key.preprocessing.to_le_bytes());
        header[16..20].copy_from_slice(&key.side.to_le_bytes());
        header[20..24].copy_from_slice(&(features.dim() as u32).to_le_bytes());
        header[24..28].copy_from_slice(&(features.classes() as u32).to_le_bytes());
        header[32..40].copy_from_slice(&(features.len() as u64).to_le_bytes());
        header[40..72].copy_from_slice(&key.backbone_sha256);
        header[72..104].copy_from_slice(&key.source_digest);
        w.write_all(&header).map_err(io(&tmp))?;
        let mut h = Sha256::new();
        let mut buf = Vec::with_capacity(CHUNK);
        for label in features.labels() {
            buf.extend_from_slice(&label.to_le_bytes());
        }
        for v in features.x().iter() {
            buf.extend_from_slice(&v.to_le_bytes());
            if buf.len() >= CHUNK {
                h.update(&buf);
                w.write_all(&buf).map_err(io(&tmp))?;
                buf.clear();
            }
        }
        h.update(&buf);
        w.write_all(&buf).map_err(io(&tmp))?;
        let inner = w.into_inner().map_err(|e| io(&tmp)(e.into_error()))?;
        inner.seek(SeekFrom::Start(104)).map_err(io(&tmp))?;
        inner.write_all(&h.finalize()).map_err(io(&tmp))?;
    }
    // Dropped on an error above, the temporary is removed and `path` left as it was.
    file.commit().map_err(io(path))
}

/// The magic and the layout version.
fn check_preamble(path: &Path, header: &[u8; HEADER_LEN]) -> Result<(), CacheError> {
    if header[..8] != MAGIC {
        return Err(CacheError::BadMagic {
            path: path.to_owned(),
        });
    }
    let version = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(CacheError::UnsupportedVersion {
            path: path.to_owned(),
            found: version,
        });
    }
    Ok(())
}

/// The key the cache at `path` says it was built under, for a cache whose source images are
/// not at hand: check what matters to the caller (the backbone, the side), then
/// [`read_cache`] with it checks the rest.
pub fn read_cache_key(path: &Path) -> Result<CacheKey, CacheError> {
    let mut file = File::open(path).map_err(io(path))?;
    let file_len = file.metadata().map_err(io(path))?.len();
    if file_len < HEADER_LEN as u64 {
        return Err(CacheError::Truncated {
            path: path.to_owned(),
            expected: HEADER_LEN as u64,
            found: file_len,
        });
    }
    let mut header = [0u8; HEADER_LEN];
    file.read_exact(&mut header).map_err(io(path))?;
    check_preamble(path, &header)?;
    let u32_at = |o: usize| u32::from_le_bytes(header[o..o + 4].try_into().expect("4 bytes"));
    Ok(CacheKey {
        backbone_sha256: header[40..72].try_into().expect("32 bytes"),
        side: u32_at(16),
        preprocessing: u32_at(12),
        source_digest: header[72..104].try_into().expect("32 bytes"),
    })
}

/// Reads the cache at `path` if it was built under `key` and is intact.
pub fn read_cache(path: &Path, key: &CacheKey) -> Result<LabelledFeatures, CacheError> {
    let file = File::open(path).map_err(io(path))?;
    let file_len = file.metadata().map_err(io(path))?.len();
    let mut r = BufReader::with_capacity(CHUNK, file);
    let mut header = [0u8; HEADER_LEN];
    if file_len < HEADER_LEN as u64 {
        return Err(CacheError::Truncated {
            path: path.to_owned(),
            expected: HEADER_LEN as u64,
            found: file_len,
        });
    }
    r.read_exact(&mut header).map_err(io(path))?;
    check_preamble(path, &header)?;
    let u32_at = |o: usize| u32::from_le_bytes(header[o..o + 4].try_into().expect("4 bytes"));
    let stale = |field| {
        Err(CacheError::Stale {
            path: path.to_owned(),
            field,
        })
    };
    if u32_at(12) != key.preprocessing {
        return stale("preprocessing");
    }
    if u32_at(16) != key.side {
        return stale("input side");
    }
    if header[40..72] != key.backbone_sha256 {
        return stale("backbone model");
    }
    if header[72..104] != key.source_digest {
        return stale("source data");
    }
    let (dim, classes) = (u32_at(20), u32_at(24));
    let count = u64::from_le_bytes(header[32..40].try_into().expect("8 bytes"));
    let bounds = |reason: String| {
        Err(CacheError::OutOfBounds {
            path: path.to_owned(),
            reason,
        })
    };
    if dim == 0 || dim > MAX_DIM {
        return bounds(format!("dim {dim} not in 1..={MAX_DIM}"));
    }
    if count == 0
        || count
            .checked_mul(u64::from(dim))
            .is_none_or(|n| n > MAX_FEATURES)
    {
        return bounds(format!(
            "{count} rows × {dim} exceeds {MAX_FEATURES} features"
        ));
    }
    let expected = HEADER_LEN as u64 + 4 * count + 4 * count * u64::from(dim);
    if file_len != expected {
        return Err(CacheError::Truncated {
            path: path.to_owned(),
            expected,
            found: file_len,
        });
    }
    let (count, dim) = (count as usize, dim as usize);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut labels = Vec::with_capacity(count);
    let mut values = Vec::with_capacity(count * dim);
    let mut remaining = 4 * count;
    // Labels, then features: both are 4-byte words, read in chunks that keep word alignment.
    while remaining > 0 || values.len() < count * dim {
        let take = if remaining > 0 {
            remaining.min(CHUNK)
        } else {
            (4 * (count * dim - values.len())).min(CHUNK)
        };
        r.read_exact(&mut buf[..take]).map_err(io(path))?;
        h.update(&buf[..take]);
        let words = buf[..take]
            .chunks_exact(4)
            .map(|b| b.try_into().expect("4 bytes"));
        if remaining > 0 {
            labels.extend(words.map(u32::from_le_bytes));
            remaining -= take;
        } else {
            values.extend(words.map(f32::from_le_bytes));
        }
    }
    if h.finalize()[..] != header[104..136] {
        return Err(CacheError::Corrupt {
            path: path.to_owned(),
        });
    }
    let x =
        Array2::from_shape_vec((count, dim), values).expect("length checked against the header");
    LabelledFeatures::new(x, labels, classes as usize).map_err(|source| CacheError::Invalid {
        path: path.to_owned(),
        source,
    })
}

/// How [`load_or_build`] got its features.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Read from an intact, matching cache.
    Hit,
    /// Built now; `reason` says why the cache was not used.
    Built {
        /// Missing, stale or corrupt, in words.
        reason: String,
    },
}

/// Reads the cache at `path` or, when it is missing, stale or corrupt (logged), calls `build`
/// and writes its result as the new cache.
pub fn load_or_build<E: From<CacheError>>(
    path: &Path,
    key: &CacheKey,
    build: impl FnOnce() -> Result<LabelledFeatures, E>,
) -> Result<(LabelledFeatures, CacheOutcome), E> {
    let reason = match read_cache(path, key) {
        Ok(features) => return Ok((features, CacheOutcome::Hit)),
        Err(CacheError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            format!("no cache at {}", path.display())
        }
        Err(e) => {
            tracing::warn!("{e}; rebuilding");
            e.to_string()
        }
    };
    let features = build()?;
    write_cache(path, key, &features)?;
    Ok((features, CacheOutcome::Built { reason }))
}
