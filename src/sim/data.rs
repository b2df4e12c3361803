//! The run's data: the features (through the backbone and its cache, or the synthetic
//! problem), and each seed's validation hold-out, partition and client shards.

use std::sync::Arc;

use anyhow::{Context, Result};
use wsa::LabelledFeatures;
use wsa::synthetic::{SyntheticProblem, SyntheticSpec};

use aggregator_core::engine::BackboneRef;

use super::config::{DataSource, FleetConfig};
use crate::partition::{Recipe, Scheme, partition};

/// A run's features, the names of their classes, and the backbone that made them.
pub(crate) struct Dataset {
    pub(crate) train: LabelledFeatures,
    pub(crate) test: LabelledFeatures,
    pub(crate) classes: Vec<String>,
    pub(crate) backbone: BackboneRef,
}

/// The training and test features of `source`.
pub(crate) fn load_data(source: &DataSource) -> Result<Dataset> {
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
            Ok(Dataset {
                train: problem.sample(*train, 1)?,
                test: problem.sample(*test, 2)?,
                classes: protocol::indexed_classes(*classes),
                backbone: BackboneRef::default(),
            })
        }
        DataSource::Images {
            format,
            data,
            model,
            side,
            cache_dir,
            train_limit,
            test_limit,
            threads,
            test_fraction,
        } => {
            let format: datasets::DataFormat = format.parse().map_err(anyhow::Error::msg)?;
            let backbone = edge_client::Backbone::load(model, *side).with_context(|| {
                format!("loading {} (run scripts/fetch-model.sh)", model.display())
            })?;
            let read = |split: datasets::Split| {
                datasets::read_set(format, data, split, &datasets::Limits::default())
                    .with_context(|| format!("reading {}", data.display()))
            };
            let one_tree = format == datasets::DataFormat::ImageFolder
                && !(data.join("train").is_dir() && data.join("test").is_dir());
            let (mut train, mut test) = if one_tree {
                split_by_class(read(datasets::Split::Train)?, *test_fraction)?
            } else {
                (read(datasets::Split::Train)?, read(datasets::Split::Test)?)
            };
            anyhow::ensure!(
                train.class_names == test.class_names,
                "the train and test trees of {} hold different classes ({:?} and {:?})",
                data.display(),
                train.class_names,
                test.class_names
            );
            let stem = data
                .file_name()
                .map_or("data".into(), |n| n.to_string_lossy().into_owned());
            let features = |set: &mut datasets::ImageSet, name: &str, limit: usize| {
                if limit > 0 && limit < set.len() {
                    set.images.truncate(limit);
                    set.labels.truncate(limit);
                }
                let cache = edge_client::cache::cache_path(
                    cache_dir,
                    &stem,
                    name,
                    *side,
                    set.len(),
                    &backbone.sha256(),
                );
                tracing::info!(
                    split = name,
                    images = set.len(),
                    "features (cached in {})",
                    cache.display()
                );
                let (features, outcome) =
                    edge_client::cached_features(&backbone, set, &cache, *threads, true)?;
                tracing::info!(split = name, ?outcome, "features ready");
                anyhow::Ok(features)
            };
            let train_features = features(&mut train, "train", *train_limit)?;
            let test_features = features(&mut test, "test", *test_limit)?;
            Ok(Dataset {
                train: train_features,
                test: test_features,
                classes: train.class_names,
                backbone: BackboneRef {
                    sha256: vec![backbone.sha256_hex()],
                    side: *side as u32,
                },
            })
        }
    }
}

/// Splits one labelled tree into train and test: of each class's images, in order, every
/// k-th goes to the test set so that it holds `test_fraction` of each class.
fn split_by_class(
    set: datasets::ImageSet,
    test_fraction: f64,
) -> Result<(datasets::ImageSet, datasets::ImageSet)> {
    anyhow::ensure!(
        test_fraction > 0.0 && test_fraction < 1.0,
        "the test fraction must be in (0, 1), got {test_fraction}"
    );
    let empty = || datasets::ImageSet {
        images: Vec::new(),
        labels: Vec::new(),
        class_names: set.class_names.clone(),
    };
    let (mut train, mut test) = (empty(), empty());
    let mut seen = vec![0usize; set.num_classes()];
    for (image, label) in set.images.into_iter().zip(set.labels) {
        let j = &mut seen[label as usize];
        // Image j joins the test set when the running share crosses the next whole image.
        let to_test =
            ((*j + 1) as f64 * test_fraction).floor() > (*j as f64 * test_fraction).floor();
        *j += 1;
        let side = if to_test { &mut test } else { &mut train };
        side.images.push(image);
        side.labels.push(label);
    }
    anyhow::ensure!(
        !train.is_empty() && !test.is_empty(),
        "too few images to hold out a test set of {test_fraction}"
    );
    Ok((train, test))
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
    let (train, validation) = hold_out(cfg, all_train, seed)?;
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

/// The training rows left to the clients of `seed`, and the validation hold-out.
pub(crate) fn hold_out(
    cfg: &FleetConfig,
    all_train: &LabelledFeatures,
    seed: u64,
) -> Result<(LabelledFeatures, Option<LabelledFeatures>)> {
    Ok(all_train.hold_out(cfg.validation_fraction, seed ^ 0x7661_6c69_6461_7465)?)
}

/// The validation hold-out of `seed` alone (no copy of the rest when there is none).
pub(crate) fn validation_of(
    cfg: &FleetConfig,
    all_train: &LabelledFeatures,
    seed: u64,
) -> Result<Option<LabelledFeatures>> {
    if cfg.validation_fraction == 0.0 {
        return Ok(None);
    }
    Ok(hold_out(cfg, all_train, seed)?.1)
}

/// Which rows each client of a seed holds, materialised one client at a time: what a pool of
/// virtual clients needs. A recipe costs nothing per client; any other scheme keeps its
/// partition (each training row once).
pub(crate) enum ClientRows {
    Partitioned(Vec<Vec<usize>>),
    Drawn(Recipe),
}

impl ClientRows {
    /// The rows of `cfg`'s clients over `train` (after the hold-out) for `seed`: the same
    /// rows [`seed_data`] gives each client.
    pub(crate) fn new(cfg: &FleetConfig, train: &LabelledFeatures, seed: u64) -> Result<Self> {
        Ok(match cfg.partition {
            Scheme::Recipe { alpha, rows } => ClientRows::Drawn(Recipe::new(
                train.labels(),
                train.classes(),
                alpha,
                rows,
                seed,
            )?),
            ref scheme => ClientRows::Partitioned(
                partition(train.labels(), train.classes(), cfg.clients, scheme, seed)?.clients,
            ),
        })
    }

    /// Client `index`'s features.
    pub(crate) fn client(
        &self,
        train: &LabelledFeatures,
        index: usize,
    ) -> Result<LabelledFeatures> {
        Ok(match self {
            ClientRows::Partitioned(clients) => train.select(&clients[index])?,
            ClientRows::Drawn(recipe) => train.select(&recipe.rows_of(index))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_tree_splits_each_class_by_the_fraction() {
        let image = datasets::Image {
            width: 1,
            height: 1,
            channels: 1,
            pixels: vec![0],
        };
        // 10 images of class 0, 5 of class 1, interleaved.
        let labels: Vec<u32> = (0..15).map(|i| u32::from(i % 3 == 2)).collect();
        let set = datasets::ImageSet {
            images: vec![image; 15],
            labels,
            class_names: vec!["a".into(), "b".into()],
        };
        let (train, test) = split_by_class(set, 0.2).unwrap();
        let count = |s: &datasets::ImageSet, c: u32| s.labels.iter().filter(|&&l| l == c).count();
        assert_eq!((count(&train, 0), count(&test, 0)), (8, 2));
        assert_eq!((count(&train, 1), count(&test, 1)), (4, 1));
        assert_eq!(test.class_names, ["a", "b"]);
    }
}
