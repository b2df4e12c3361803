//! Server-side evaluation: a labelled set the aggregator holds, turned into features by the
//! clients' backbone and numbered by the run's classes (or a feature cache of one), on which
//! the engine evaluates every new global head.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};

/// The format name of a feature cache file as the evaluation set.
pub const FEATURES_FORMAT: &str = "features";

/// The evaluation set's features under the run's class numbering, through the backbone the
/// clients run (checked against the run's `[backbone]`) and a feature cache; or, in
/// [`FEATURES_FORMAT`], read from a feature cache file.
pub fn load_eval_set(
    config: &aggregator_core::engine::EngineConfig,
    path: &Path,
    format: &str,
    split: &str,
    backbone_path: &Path,
    cache_dir: &Path,
) -> Result<wsa::LabelledFeatures> {
    if format == FEATURES_FORMAT {
        return load_feature_cache(config, path);
    }
    let format: datasets::DataFormat = format.parse().map_err(anyhow::Error::msg)?;
    let split: datasets::Split = split.parse().map_err(anyhow::Error::msg)?;
    let set = datasets::read_set(format, path, split, &datasets::Limits::default())
        .with_context(|| format!("reading the evaluation set {}", path.display()))?;
    let side = config.backbone.side as usize;
    let backbone = edge_client::Backbone::load(backbone_path, side)?;
    let sha = backbone.sha256_hex();
    anyhow::ensure!(
        edge_client::predict::names_backbone(&config.backbone.sha256, &sha),
        "{} (sha256 {sha}) is not a backbone the run names in [backbone]; its features would \
         not be the clients'",
        backbone_path.display()
    );
    std::fs::create_dir_all(cache_dir)
        .with_context(|| format!("creating {}", cache_dir.display()))?;
    let cache = cache_dir.join(format!("eval-{side}.feat"));
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (features, outcome) = edge_client::cached_features(&backbone, &set, &cache, threads, true)?;
    tracing::info!(rows = features.len(), ?outcome, "evaluation features ready");
    let local = edge_client::LocalData::new(std::sync::Arc::new(features), set.class_names)?;
    let map = edge_client::labels::class_map(local.class_names(), &config.classes)
        .with_context(|| format!("the evaluation set {}", path.display()))?;
    Ok(Arc::unwrap_or_clone(
        local.relabel(&map, config.classes.len())?,
    ))
}

/// A feature cache file as the evaluation set: built by the run's backbone (one the run names)
/// at the clients' side and preprocessing, over as many classes as the run has. It carries
/// labels but no class names, so label i is taken as the run's class i.
fn load_feature_cache(
    config: &aggregator_core::engine::EngineConfig,
    path: &Path,
) -> Result<wsa::LabelledFeatures> {
    let key = edge_client::cache::read_cache_key(path)?;
    let sha = hex::encode(key.backbone_sha256);
    anyhow::ensure!(
        edge_client::predict::names_backbone(&config.backbone.sha256, &sha),
        "{}: its features come from the backbone with sha256 {sha}, which the run does not \
         name in [backbone]; they would not be the clients'",
        path.display()
    );
    anyhow::ensure!(
        key.side == config.backbone.side
            && key.preprocessing == edge_client::preprocess::PREPROCESSING_ID,
        "{}: built at input side {} with preprocessing {}, the run's clients use side {} and \
         preprocessing {}",
        path.display(),
        key.side,
        key.preprocessing,
        config.backbone.side,
        edge_client::preprocess::PREPROCESSING_ID
    );
    let features = edge_client::cache::read_cache(path, &key)?;
    anyhow::ensure!(
        features.classes() == config.classes.len() && features.dim() == config.head.input,
        "{}: {} classes of {}-wide features, the run has {} classes of {}-wide features; a \
         feature cache names no classes, so its label i must be the run's class i",
        path.display(),
        features.classes(),
        features.dim(),
        config.classes.len(),
        config.head.input
    );
    tracing::info!(rows = features.len(), path = %path.display(), "evaluation features read");
    Ok(features)
}
