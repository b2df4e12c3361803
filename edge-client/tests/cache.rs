//! The feature cache round-trips, and a stale, truncated or corrupt cache is detected, never
//! used, and rebuilt by `load_or_build`.

use std::path::Path;

use edge_client::cache::{
    CacheError, CacheKey, CacheOutcome, load_or_build, read_cache, write_cache,
};
use ndarray::Array2;
use wsa::LabelledFeatures;

fn features(rows: usize, dim: usize, seed: u32) -> LabelledFeatures {
    let x = Array2::from_shape_fn((rows, dim), |(i, j)| {
        (i * dim + j) as f32 * 0.25 + seed as f32
    });
    let labels = (0..rows as u32).map(|i| (i + seed) % 10).collect();
    LabelledFeatures::new(x, labels, 10).unwrap()
}

fn key() -> CacheKey {
    CacheKey {
        backbone_sha256: [7; 32],
        side: 96,
        preprocessing: 1,
        source_digest: [9; 32],
    }
}

fn build_with(f: LabelledFeatures) -> impl FnOnce() -> Result<LabelledFeatures, CacheError> {
    move || Ok(f)
}

#[test]
fn a_written_cache_reads_back_exactly_and_is_a_hit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/train.feat");
    let f = features(300, 1280, 0);
    let (got, outcome) = load_or_build(&path, &key(), build_with(f.clone())).unwrap();
    assert!(matches!(outcome, CacheOutcome::Built { .. }));
    assert_eq!(got, f);
    assert_eq!(read_cache(&path, &key()).unwrap(), f);
    let (again, outcome) = load_or_build(&path, &key(), || -> Result<_, CacheError> {
        panic!("a matching cache must not be rebuilt")
    })
    .unwrap();
    assert_eq!(outcome, CacheOutcome::Hit);
    assert_eq!(again, f);
    // Nothing but the cache is left behind (no temporary files).
    assert_eq!(
        std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
        1
    );
}

#[test]
fn each_stale_field_is_named_and_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.feat");
    write_cache(&path, &key(), &features(5, 4, 0)).unwrap();
    let cases = [
        (
            "backbone model",
            CacheKey {
                backbone_sha256: [8; 32],
                ..key()
            },
        ),
        ("input side", CacheKey { side: 224, ..key() }),
        (
            "preprocessing",
            CacheKey {
                preprocessing: 2,
                ..key()
            },
        ),
        (
            "source data",
            CacheKey {
                source_digest: [0; 32],
                ..key()
            },
        ),
    ];
    for (field, other) in cases {
        match read_cache(&path, &other) {
            Err(CacheError::Stale { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: {other:?}"),
        }
    }
    let fresh = features(5, 4, 3);
    let (got, outcome) = load_or_build(&path, &cases[1].1, build_with(fresh.clone())).unwrap();
    assert_eq!(got, fresh);
    assert!(matches!(outcome, CacheOutcome::Built { reason } if reason.contains("input side")));
    assert_eq!(read_cache(&path, &cases[1].1).unwrap(), fresh);
}

fn corrupt(path: &Path, edit: impl FnOnce(&mut Vec<u8>)) {
    let mut bytes = std::fs::read(path).unwrap();
    edit(&mut bytes);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn corrupt_and_truncated_caches_are_detected_and_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.feat");
    let f = features(50, 16, 1);
    type Edit = Box<dyn Fn(&mut Vec<u8>)>;
    type Check = fn(&CacheError) -> bool;
    let cases: Vec<(Edit, Check)> = vec![
        (Box::new(|b| b[500] ^= 0x40), |e| {
            matches!(e, CacheError::Corrupt { .. })
        }),
        (
            Box::new(|b| {
                b.pop();
            }),
            |e| matches!(e, CacheError::Truncated { .. }),
        ),
        (Box::new(|b| b.extend([0; 4])), |e| {
            matches!(e, CacheError::Truncated { .. })
        }),
        (Box::new(|b| b.truncate(20)), |e| {
            matches!(e, CacheError::Truncated { .. })
        }),
        (Box::new(|b| b[0] = b'X'), |e| {
            matches!(e, CacheError::BadMagic { .. })
        }),
        (Box::new(|b| b[8] = 99), |e| {
            matches!(e, CacheError::UnsupportedVersion { found: 99, .. })
        }),
        (
            Box::new(|b| b[20..24].copy_from_slice(&0u32.to_le_bytes())),
            |e| matches!(e, CacheError::OutOfBounds { .. }),
        ),
        (
            Box::new(|b| b[32..40].copy_from_slice(&u64::MAX.to_le_bytes())),
            |e| matches!(e, CacheError::OutOfBounds { .. }),
        ),
    ];
    for (i, (edit, check)) in cases.into_iter().enumerate() {
        write_cache(&path, &key(), &f).unwrap();
        corrupt(&path, edit);
        let err = read_cache(&path, &key()).unwrap_err();
        assert!(check(&err), "case {i}: {err:?}");
        let (got, outcome) = load_or_build(&path, &key(), build_with(f.clone())).unwrap();
        assert!(matches!(outcome, CacheOutcome::Built { .. }), "case {i}");
        assert_eq!(got, f);
        assert_eq!(
            read_cache(&path, &key()).unwrap(),
            f,
            "case {i}: rebuilt cache reads back"
        );
    }
}

#[test]
fn a_non_finite_feature_in_an_intact_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.feat");
    write_cache(&path, &key(), &features(3, 2, 0)).unwrap();
    // Rewrite one feature to NaN and fix the checksum, as a buggy writer would produce.
    corrupt(&path, |b| {
        let at = 136 + 3 * 4;
        b[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
        use sha2::Digest;
        let digest = sha2::Sha256::digest(&b[136..]);
        b[104..136].copy_from_slice(&digest);
    });
    assert!(matches!(
        read_cache(&path, &key()),
        Err(CacheError::Invalid { .. })
    ));
}

#[test]
fn each_backbone_has_its_own_cache_file() {
    let dir = Path::new("cache");
    let (f32_sha, int8_sha) = ([1u8; 32], [2u8; 32]);
    let f32_file = edge_client::cache::cache_path(dir, "fmnist", "train", 96, 600, &f32_sha);
    assert_eq!(f32_file, dir.join("fmnist-train-96-600-010101010101.feat"));
    assert_ne!(
        f32_file,
        edge_client::cache::cache_path(dir, "fmnist", "train", 96, 600, &int8_sha)
    );
}
