use std::path::Path;

use datasets::ImageSet;
use wsa::LabelledFeatures;

use crate::backbone::Backbone;
use crate::cache::{CacheKey, CacheOutcome, digest_images, load_or_build};
use crate::error::FeatureError;
use crate::preprocess::PREPROCESSING_ID;

/// The features of `set` under `backbone`: from the cache at `cache_path` when it matches,
/// else extracted on `threads` threads and cached.
pub fn cached_features(
    backbone: &Backbone,
    set: &ImageSet,
    cache_path: &Path,
    threads: usize,
    progress: bool,
) -> Result<(LabelledFeatures, CacheOutcome), FeatureError> {
    let key = CacheKey {
        backbone_sha256: backbone.sha256(),
        side: backbone.side() as u32,
        preprocessing: PREPROCESSING_ID,
        source_digest: digest_images(set),
    };
    load_or_build(cache_path, &key, || {
        let x = backbone.extract(&set.images, threads, progress)?;
        Ok(LabelledFeatures::new(
            x,
            set.labels.clone(),
            set.class_names.len(),
        )?)
    })
}
