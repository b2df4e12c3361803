//! The partitioners: every sample assigned once, skew ordered as the schemes promise,
//! constraints kept, determinism, and a typed error for every bad input.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use wsa_fl::partition::*;

/// `n` labels over `classes` classes, balanced, in label-cycling order.
fn balanced(n: usize, classes: usize) -> Vec<u32> {
    (0..n).map(|i| (i % classes) as u32).collect()
}

/// Uneven class sizes: class k has about (k + 1) shares, plus one class with a single sample.
fn uneven(classes: usize) -> Vec<u32> {
    let mut labels = Vec::new();
    for k in 0..classes - 1 {
        labels.extend(std::iter::repeat_n(k as u32, 40 * (k + 1) + 7));
    }
    labels.push((classes - 1) as u32);
    // Interleave so class order is not index order.
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    for i in (1..labels.len()).rev() {
        labels.swap(i, rng.random_range(0..=i));
    }
    labels
}

fn schemes() -> Vec<Scheme> {
    vec![
        Scheme::Iid,
        Scheme::Dirichlet {
            alpha: 0.5,
            min_size: 0,
        },
        Scheme::Dirichlet {
            alpha: 0.01,
            min_size: 0,
        },
        Scheme::Shards {
            classes_per_client: 2,
        },
    ]
}

fn assert_exact_cover(p: &Partition, samples: usize) {
    let mut seen = vec![0u8; samples];
    for client in &p.clients {
        assert!(
            client.windows(2).all(|w| w[0] < w[1]),
            "indices not ascending"
        );
        for &i in client {
            seen[i] += 1;
        }
    }
    assert!(
        seen.iter().all(|&s| s == 1),
        "{:?}: some sample not assigned exactly once",
        p.scheme
    );
    assert_eq!(p.sizes().iter().sum::<usize>(), samples);
}

#[test]
fn every_sample_is_assigned_exactly_once() {
    for labels in [balanced(1000, 10), uneven(7)] {
        for clients in [1, 3, 10, 20] {
            for scheme in schemes() {
                match partition(&labels, 10, clients, &scheme, 7) {
                    Ok(p) => {
                        assert_eq!(p.clients.len(), clients);
                        assert_exact_cover(&p, labels.len());
                    }
                    // Two classes each for fewer than 5 clients cannot cover every class.
                    Err(PartitionError::TooFewShards { .. }) => assert!(clients * 2 < 7),
                    Err(e) => panic!("{scheme:?}, {clients} clients: {e}"),
                }
            }
        }
    }
}

#[test]
fn random_inputs_are_covered_exactly_and_deterministically() {
    // A seeded property test: small random label sets, client counts and schemes.
    let mut rng = ChaCha8Rng::seed_from_u64(2024);
    for case in 0..300 {
        let classes = rng.random_range(1..12);
        let samples = rng.random_range(1..400);
        let labels: Vec<u32> = (0..samples)
            .map(|_| rng.random_range(0..classes as u32))
            .collect();
        let clients = rng.random_range(1..=samples.min(40));
        let scheme = match rng.random_range(0..3) {
            0 => Scheme::Iid,
            1 => Scheme::Dirichlet {
                alpha: 10f64.powf(rng.random_range(-3.0..3.0)),
                min_size: 0,
            },
            _ => Scheme::Shards {
                classes_per_client: rng.random_range(1..=classes),
            },
        };
        let seed = rng.random();
        match partition(&labels, classes, clients, &scheme, seed) {
            Ok(p) => {
                assert_exact_cover(&p, samples);
                if let Scheme::Shards { classes_per_client } = scheme {
                    for h in p.label_histograms(&labels, classes) {
                        let held = h.iter().filter(|&&n| n > 0).count();
                        assert!((1..=classes_per_client).contains(&held), "case {case}");
                    }
                }
                let skew = p.skew(&labels, classes);
                assert!((0.0..=1.0).contains(&skew), "case {case}: skew {skew}");
                assert_eq!(
                    p,
                    partition(&labels, classes, clients, &scheme, seed).unwrap()
                );
            }
            // The only legitimate failure here: too few shards to cover every class.
            Err(PartitionError::TooFewShards { .. }) => {}
            Err(e) => panic!("case {case}: {e}"),
        }
    }
}

#[test]
fn dirichlet_skew_grows_as_alpha_falls() {
    let labels = balanced(6000, 10);
    let skew = |scheme: Scheme| {
        partition(&labels, 10, 20, &scheme, 1)
            .unwrap()
            .skew(&labels, 10)
    };
    let iid = skew(Scheme::Iid);
    let skews: Vec<f64> = [100.0, 1.0, 0.1]
        .iter()
        .map(|&alpha| skew(Scheme::Dirichlet { alpha, min_size: 0 }))
        .collect();
    let shards = skew(Scheme::Shards {
        classes_per_client: 2,
    });
    println!("skew: iid {iid:.3}, α = 100 / 1 / 0.1: {skews:.3?}, shards-2 {shards:.3}");
    assert!(iid < 0.1, "iid skew {iid}");
    assert!(skews.windows(2).all(|w| w[0] < w[1]), "{skews:?}");
    assert!(skews[2] > 0.5, "{skews:?}");
    // Two of ten balanced classes per client: each client's distance is exactly 0.8.
    assert!((shards - 0.8).abs() < 1e-9, "shards skew {shards}");
}

#[test]
fn one_class_per_client_has_the_documented_maximum_skew() {
    let labels = balanced(1000, 10);
    let p = partition(
        &labels,
        10,
        10,
        &Scheme::Shards {
            classes_per_client: 1,
        },
        3,
    )
    .unwrap();
    assert!((p.skew(&labels, 10) - 0.9).abs() < 1e-12);
}

#[test]
fn iid_sizes_differ_by_at_most_one() {
    let p = partition(&balanced(1003, 10), 10, 10, &Scheme::Iid, 5).unwrap();
    let sizes = p.sizes();
    assert!(
        sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1,
        "{sizes:?}"
    );
}

#[test]
fn dirichlet_respects_min_size() {
    let labels = balanced(6000, 10);
    for seed in 0..5 {
        let p = partition(
            &labels,
            10,
            20,
            &Scheme::Dirichlet {
                alpha: 0.1,
                min_size: 50,
            },
            seed,
        )
        .unwrap();
        assert!(p.sizes().iter().all(|&s| s >= 50), "{:?}", p.sizes());
        assert_exact_cover(&p, labels.len());
    }
}

#[test]
fn tiny_alpha_neither_panics_nor_loses_samples() {
    let labels = balanced(2000, 10);
    for alpha in [1e-2, 1e-4, 1e-300] {
        let p = partition(
            &labels,
            10,
            20,
            &Scheme::Dirichlet { alpha, min_size: 0 },
            11,
        )
        .unwrap();
        assert_exact_cover(&p, labels.len());
        let skew = p.skew(&labels, 10);
        assert!(skew.is_finite() && skew > 0.8, "α = {alpha}: skew {skew}");
    }
}

#[test]
fn shards_give_each_client_its_classes() {
    let labels = balanced(6000, 10);
    for (clients, per_client) in [(20, 2), (10, 1), (20, 3), (7, 4), (30, 10)] {
        let p = partition(
            &labels,
            10,
            clients,
            &Scheme::Shards {
                classes_per_client: per_client,
            },
            4,
        )
        .unwrap();
        for h in p.label_histograms(&labels, 10) {
            // Every class has ≥ `clients` samples, so each client gets exactly its count.
            assert_eq!(h.iter().filter(|&&n| n > 0).count(), per_client, "{h:?}");
        }
        let sizes = p.sizes();
        let (lo, hi) = (*sizes.iter().min().unwrap(), *sizes.iter().max().unwrap());
        // Equal shards when the shard count divides among the classes, else sizes close.
        let even = (clients * per_client) % 10 == 0;
        assert!(
            if even { lo == hi } else { hi * 2 <= lo * 3 },
            "{clients} clients × {per_client}: {sizes:?}"
        );
    }
}

#[test]
fn shards_on_uneven_classes_stay_within_the_class_budget() {
    let labels = uneven(7);
    for clients in [4, 13, 50] {
        let p = partition(
            &labels,
            7,
            clients,
            &Scheme::Shards {
                classes_per_client: 2,
            },
            8,
        )
        .unwrap();
        for h in p.label_histograms(&labels, 7) {
            let held = h.iter().filter(|&&n| n > 0).count();
            assert!((1..=2).contains(&held), "{h:?}");
        }
    }
}

#[test]
fn shard_pairings_vary_with_the_seed() {
    let labels = balanced(6000, 10);
    let pairs = |seed| {
        let p = partition(
            &labels,
            10,
            20,
            &Scheme::Shards {
                classes_per_client: 2,
            },
            seed,
        )
        .unwrap();
        let mut pairs: Vec<Vec<usize>> = p
            .label_histograms(&labels, 10)
            .iter()
            .map(|h| (0..10).filter(|&k| h[k] > 0).collect())
            .collect();
        pairs.sort();
        pairs.dedup();
        pairs
    };
    // A rigid layout would give only 5 distinct pairs (k with k + 5).
    assert!(pairs(1).len() > 5, "{:?}", pairs(1));
    assert_ne!(pairs(1), pairs(2));
}

#[test]
fn same_seed_same_partition_other_seed_other_partition() {
    let labels = uneven(10);
    for scheme in schemes() {
        let a = partition(&labels, 10, 8, &scheme, 42).unwrap();
        assert_eq!(a, partition(&labels, 10, 8, &scheme, 42).unwrap());
        assert_ne!(
            a.clients,
            partition(&labels, 10, 8, &scheme, 43).unwrap().clients,
            "{scheme:?}"
        );
        assert_eq!((a.seed, &a.scheme), (42, &scheme));
    }
}

#[test]
fn bad_inputs_give_typed_errors() {
    let labels = balanced(100, 10);
    let iid = Scheme::Iid;
    assert_eq!(
        partition(&labels, 10, 0, &iid, 0),
        Err(PartitionError::NoClients)
    );
    assert_eq!(
        partition(&labels, 10, 101, &iid, 0),
        Err(PartitionError::TooManyClients {
            clients: 101,
            samples: 100
        })
    );
    assert!(matches!(
        partition(&[], 10, 1, &iid, 0),
        Err(PartitionError::TooManyClients { samples: 0, .. })
    ));
    for alpha in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let err =
            partition(&labels, 10, 5, &Scheme::Dirichlet { alpha, min_size: 0 }, 0).unwrap_err();
        assert!(
            matches!(err, PartitionError::BadAlpha { .. }),
            "α = {alpha}: {err}"
        );
    }
    for classes_per_client in [0, 11] {
        assert_eq!(
            partition(&labels, 10, 5, &Scheme::Shards { classes_per_client }, 0),
            Err(PartitionError::BadClassesPerClient {
                classes_per_client,
                classes: 10
            })
        );
    }
    assert_eq!(
        partition(
            &labels,
            10,
            3,
            &Scheme::Shards {
                classes_per_client: 2
            },
            0
        ),
        Err(PartitionError::TooFewShards {
            clients: 3,
            classes_per_client: 2,
            present: 10
        })
    );
    assert_eq!(
        partition(&[0, 1, 9, 2], 9, 2, &iid, 0),
        Err(PartitionError::LabelOutOfRange {
            index: 2,
            label: 9,
            classes: 9
        })
    );
    assert_eq!(
        partition(
            &labels,
            10,
            10,
            &Scheme::Dirichlet {
                alpha: 1.0,
                min_size: 11
            },
            0
        ),
        Err(PartitionError::MinSizeImpossible {
            min_size: 11,
            clients: 10,
            samples: 100
        })
    );
    let err = partition(
        &balanced(6000, 10),
        10,
        100,
        &Scheme::Dirichlet {
            alpha: 0.001,
            min_size: 50,
        },
        0,
    )
    .unwrap_err();
    assert_eq!(
        err,
        PartitionError::MinSizeNotMet {
            alpha: 0.001,
            min_size: 50,
            clients: 100,
            attempts: DIRICHLET_ATTEMPTS
        }
    );
    let message = err.to_string();
    assert!(
        message.contains("0.001") && message.contains("50"),
        "{message}"
    );
}

#[test]
fn histograms_and_json_agree_with_the_partition() {
    let labels = uneven(5);
    let p = partition(
        &labels,
        5,
        4,
        &Scheme::Dirichlet {
            alpha: 1.0,
            min_size: 10,
        },
        9,
    )
    .unwrap();
    let histograms = p.label_histograms(&labels, 5);
    assert_eq!(
        histograms
            .iter()
            .map(|h| h.iter().sum())
            .collect::<Vec<usize>>(),
        p.sizes()
    );
    // Wrong labels are skipped, not a panic.
    assert_eq!(p.label_histograms(&[7; 3], 5).len(), 4);
    assert_eq!(p.skew(&[], 5), 0.0);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("partition.json");
    p.write_json(&path, &labels, 5).unwrap();
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(json["scheme"]["kind"], "dirichlet");
    assert_eq!(json["scheme"]["min_size"], 10);
    assert_eq!(json["seed"], 9);
    let clients = json["clients"].as_array().unwrap();
    assert_eq!(clients.len(), 4);
    for ((c, indices), histogram) in clients.iter().zip(&p.clients).zip(&histograms) {
        assert_eq!(c["indices"], serde_json::json!(indices));
        assert_eq!(c["histogram"], serde_json::json!(histogram));
    }
    // Only the file itself: the temporary was renamed.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    assert!(
        p.write_json(&dir.path().join("missing/p.json"), &labels, 5)
            .is_err()
    );
}

#[test]
fn scheme_serializes_with_a_kebab_cased_kind_tag() {
    let s = Scheme::Shards {
        classes_per_client: 2,
    };
    let json = serde_json::to_string(&s).unwrap();
    assert_eq!(json, r#"{"kind":"shards","classes_per_client":2}"#);
    assert_eq!(serde_json::from_str::<Scheme>(&json).unwrap(), s);
    assert_eq!(
        serde_json::from_str::<Scheme>(r#"{"kind":"iid"}"#).unwrap(),
        Scheme::Iid
    );
}

#[test]
fn a_recipe_client_is_a_function_of_its_index_alone() {
    let labels = uneven(6);
    let recipe = Recipe::new(&labels, 6, 0.5, 40, 3).unwrap();
    // The same client whatever the fleet's size, and the partition draws the recipe's rows.
    let small = partition(
        &labels,
        6,
        5,
        &Scheme::Recipe {
            alpha: 0.5,
            rows: 40,
        },
        3,
    )
    .unwrap();
    let large = partition(
        &labels,
        6,
        labels.len() * 3,
        &Scheme::Recipe {
            alpha: 0.5,
            rows: 40,
        },
        3,
    )
    .unwrap();
    for c in 0..5 {
        assert_eq!(small.clients[c], recipe.rows_of(c));
        assert_eq!(large.clients[c], recipe.rows_of(c));
    }
    assert_eq!(large.clients.len(), labels.len() * 3);
    // Sizes uniform in [20, 60], rows in range and sorted; another seed, another client.
    for rows in &large.clients {
        assert!((20..=60).contains(&rows.len()), "{}", rows.len());
        assert!(rows.windows(2).all(|w| w[0] <= w[1]));
        assert!(rows.iter().all(|&r| r < labels.len()));
    }
    let sizes: std::collections::BTreeSet<usize> = large.clients.iter().map(Vec::len).collect();
    assert!(sizes.len() > 30, "sizes should spread over the range");
    let other = Recipe::new(&labels, 6, 0.5, 40, 4).unwrap();
    assert_ne!(other.rows_of(0), recipe.rows_of(0));
}

#[test]
fn a_recipe_skews_its_class_mix_as_alpha_says() {
    let labels = balanced(6000, 10);
    let classes_held = |alpha: f64| {
        let recipe = Recipe::new(&labels, 10, alpha, 200, 1).unwrap();
        let mut total = 0;
        for c in 0..200 {
            let mut seen = std::collections::BTreeSet::new();
            // Classes holding at least 5% of the client's rows.
            let rows = recipe.rows_of(c);
            let mut counts = [0usize; 10];
            for &r in &rows {
                counts[labels[r] as usize] += 1;
            }
            for (k, &n) in counts.iter().enumerate() {
                if n * 20 >= rows.len() {
                    seen.insert(k);
                }
            }
            total += seen.len();
        }
        total as f64 / 200.0
    };
    let (skewed, flat) = (classes_held(0.1), classes_held(1000.0));
    assert!(skewed < 3.0, "α = 0.1 holds {skewed} classes a client");
    assert!(flat > 9.5, "α = 1000 holds {flat} classes a client");
}

#[test]
fn a_recipe_refuses_bad_numbers() {
    let labels = balanced(100, 4);
    assert!(matches!(
        Recipe::new(&labels, 4, 0.0, 10, 0),
        Err(PartitionError::BadAlpha { .. })
    ));
    assert!(matches!(
        Recipe::new(&labels, 4, 1.0, 0, 0),
        Err(PartitionError::EmptyRecipe { .. })
    ));
    assert!(matches!(
        Recipe::new(&labels, 3, 1.0, 10, 0),
        Err(PartitionError::LabelOutOfRange { .. })
    ));
}
