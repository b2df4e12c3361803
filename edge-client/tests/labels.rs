//! Image-folder clients holding different subsets of a run's classes train under the run's
//! numbering: each folder's sorted position is its local label, but what reaches training is
//! the index the run gives that name.

use std::path::Path;
use std::sync::Arc;

use datasets::{Limits, read_image_folder};
use edge_client::LocalData;
use edge_client::labels::class_map;
use wsa::LabelledFeatures;

const RUN: [&str; 4] = ["bird", "cat", "dog", "fox"];

/// Writes `root/<class>/<i>.png` for each class, every pixel of which holds the class's index
/// in the run, so each image carries its true label.
fn image_folder(root: &Path, classes: &[&str]) {
    for class in classes {
        let truth = RUN.iter().position(|c| c == class).unwrap() as u8;
        let dir = root.join(class);
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..3 {
            image::GrayImage::from_pixel(4, 4, image::Luma([truth]))
                .save(dir.join(format!("{i}.png")))
                .unwrap();
        }
    }
}

/// A client's data as `edge-client join` builds it, with one feature: the image's true label.
fn local_data(root: &Path) -> (LocalData, Vec<u32>) {
    let set = read_image_folder(root, &Limits::default()).unwrap();
    let truth: Vec<u32> = set.images.iter().map(|im| im.pixels[0].into()).collect();
    let x = ndarray::Array2::from_shape_fn((set.len(), 1), |(i, _)| truth[i] as f32);
    let features = LabelledFeatures::new(x, set.labels, set.class_names.len()).unwrap();
    (
        LocalData::new(Arc::new(features), set.class_names).unwrap(),
        truth,
    )
}

#[test]
fn disjoint_image_folders_train_on_the_runs_indices() {
    let dir = tempfile::tempdir().unwrap();
    let run: Vec<String> = RUN.map(String::from).to_vec();
    for (client, classes) in [("a", &["bird", "dog"]), ("b", &["cat", "fox"])] {
        let root = dir.path().join(client);
        image_folder(&root, classes);
        let (local, truth) = local_data(&root);
        // Locally, the folders sort to labels 0 and 1: not the run's indices.
        assert_ne!(local.features().labels(), &truth[..], "client {client}");

        let map = class_map(local.class_names(), &run).unwrap();
        let trained_on = local.relabel(&map, run.len()).unwrap();
        assert_eq!(trained_on.labels(), &truth[..], "client {client}");
        assert_eq!(trained_on.classes(), RUN.len());
    }
}

#[test]
fn a_folder_the_run_does_not_name_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    image_folder(dir.path(), &["cat"]);
    std::fs::create_dir_all(dir.path().join("zebra")).unwrap();
    image::GrayImage::new(4, 4)
        .save(dir.path().join("zebra/0.png"))
        .unwrap();
    let set = read_image_folder(dir.path(), &Limits::default()).unwrap();
    let run: Vec<String> = RUN.map(String::from).to_vec();
    let err = class_map(&set.class_names, &run).unwrap_err();
    assert!(err.to_string().contains("\"zebra\""), "{err}");
}
