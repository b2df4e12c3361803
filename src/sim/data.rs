//! The run's data: the features (through the backbone and its cache, or the synthetic
//! problem), and each seed's validation hold-out, partition and client shards.

use std::sync::Arc;

use anyhow::{Context, Result};
use wsa::LabelledFeatures;
use wsa::synthetic::{SyntheticProblem, SyntheticSpec};

use super::config::{DataSource, FleetConfig};
use crate::partition::partition;

/// The training and test features of `source`.
pub(crate) fn load_data(source: &DataSource) -> Result<(LabelledFeatures, LabelledFeatures)> {
    match source {
        DataSource::Synthetic {
            dim,
            classes,
            train,
            test,
        } => {
            let problem = SyntheticProblem::new(
                SyntheticSpec {
                    classes: *classes,
                    dim: *dim,
                    ..SyntheticSpec::default()
                },
                0,
            )?;
            Ok((problem.sample(*train, 1)?, problem.sample(*test, 2)?))
        }
        DataSource::FashionMnist {
            data,
            model,
            side,
            cache_dir,
            train_limit,
            test_limit,
            threads,
        } => {
            let backbone = edge_client::Backbone::load(model, *side).with_context(|| {
                format!("loading {} (run scripts/fetch-model.sh)", model.display())
            })?;
            let split = |split: datasets::Split, limit: usize| -> Result<LabelledFeatures> {
                let name = split.name();
                let mut set = datasets::read_fashion_mnist(
                    data,
                    split,
                    &datasets::Limits::default(),
                )
                .with_context(|| {
                    format!(
                        "reading Fashion-MNIST from {} (run scripts/fetch-fashion-mnist.sh)",
                        data.display()
                    )
                })?;
                if limit > 0 && limit < set.len() {
                    set.images.truncate(limit);
                    set.labels.truncate(limit);
                }
                let cache =
                    cache_dir.join(format!("fashion-mnist-{name}-{side}-{}.feat", set.len()));
                tracing::info!(
                    split = name,
                    images = set.len(),
                    "features (cached in {})",
                    cache.display()
                );
                let (features, outcome) =
                    edge_client::cached_features(&backbone, &set, &cache, *threads, true)?;
                tracing::info!(split = name, ?outcome, "features ready");
                Ok(features)
            };
            Ok((
                split(datasets::Split::Train, *train_limit)?,
                split(datasets::Split::Test, *test_limit)?,
            ))
        }
    }
}

/// One seed's view of the training set: the validation hold-out, the partition of the rest and
/// each client's rows. Deterministic from the seed, so client processes rebuild it exactly.
pub(crate) struct SeedData {
    pub(crate) train: LabelledFeatures,
    pub(crate) validation: Option<LabelledFeatures>,
    pub(crate) split: crate::partition::Partition,
    pub(crate) shards: Vec<Arc<LabelledFeatures>>,
}

pub(crate) fn seed_data(
    cfg: &FleetConfig,
    all_train: &LabelledFeatures,
    seed: u64,
) -> Result<SeedData> {
    let (train, validation) = hold_out(all_train, cfg.validation_fraction, seed)?;
    let split = partition(
        train.labels(),
        train.classes(),
        cfg.clients,
        &cfg.partition,
        seed,
    )?;
    let shards = split
        .clients
        .iter()
        .map(|idx| train.select(idx).map(Arc::new))
        .collect::<wsa::Result<_>>()?;
    Ok(SeedData {
        train,
        validation,
        split,
        shards,
    })
}

/// Splits `fraction` of `data` off at random (seeded) as a validation set.
fn hold_out(
    data: &LabelledFeatures,
    fraction: f64,
    seed: u64,
) -> Result<(LabelledFeatures, Option<LabelledFeatures>)> {
    use rand::SeedableRng;
    use rand::seq::SliceRandom;
    let n_val = (data.len() as f64 * fraction).round() as usize;
    if n_val == 0 {
        return Ok((data.clone(), None));
    }
    let mut order: Vec<usize> = (0..data.len()).collect();
    order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(
        seed ^ 0x7661_6c69_6461_7465,
    ));
    let (val, rest) = order.split_at(n_val);
    let mut rest = rest.to_vec();
    rest.sort_unstable();
    Ok((data.select(&rest)?, Some(data.select(val)?)))
}
