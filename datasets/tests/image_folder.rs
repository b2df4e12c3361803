//! Image-folder loader: PNG and JPEG round trips, ordering, skipping rules, and rejections.

mod common;

use std::fs;
use std::path::Path;

use common::{Bytes, write};
use datasets::{DatasetError, Limits, read_image_folder};
use image::{GrayImage, ImageBuffer, Luma, Rgb, RgbImage, Rgba, RgbaImage};
use tempfile::TempDir;

fn class_dir(root: &Path, name: &str) -> std::path::PathBuf {
    let dir = root.join(name);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn grey(width: u32, height: u32, seed: u64) -> GrayImage {
    GrayImage::from_raw(
        width,
        height,
        Bytes::new(seed).take((width * height) as usize),
    )
    .unwrap()
}

fn rgb(width: u32, height: u32, seed: u64) -> RgbImage {
    RgbImage::from_raw(
        width,
        height,
        Bytes::new(seed).take((width * height * 3) as usize),
    )
    .unwrap()
}

fn load(root: &Path) -> Result<datasets::ImageSet, DatasetError> {
    read_image_folder(root, &Limits::default())
}

#[test]
fn png_files_round_trip_exact_pixels_with_sorted_classes_and_files() {
    let dir = TempDir::new().unwrap();
    let root = dir.path();
    // Created out of order: labels and order must come from sorted names.
    let zebra = class_dir(root, "zebra");
    let ant = class_dir(root, "ant");
    let (g, c1, c2) = (grey(5, 3, 1), rgb(4, 6, 2), rgb(2, 2, 3));
    c1.save(zebra.join("b.png")).unwrap();
    c2.save(zebra.join("a.PNG")).unwrap();
    g.save(ant.join("only.png")).unwrap();

    let set = load(root).unwrap();
    assert_eq!(set.class_names, ["ant", "zebra"]);
    assert_eq!(set.labels, [0, 1, 1]);
    let expected = [
        (5, 3, 1, g.into_raw()),
        // "a.PNG" sorts before "b.png".
        (2, 2, 3, c2.into_raw()),
        (4, 6, 3, c1.into_raw()),
    ];
    for (image, (w, h, c, pixels)) in set.images.iter().zip(expected) {
        assert_eq!((image.width, image.height, image.channels), (w, h, c));
        assert_eq!(image.pixels, pixels);
    }
}

#[test]
fn alpha_is_dropped_and_deep_grey_stays_one_channel() {
    let dir = TempDir::new().unwrap();
    let class = class_dir(dir.path(), "c");
    let rgba = RgbaImage::from_fn(3, 2, |x, y| Rgba([x as u8 * 80, y as u8 * 90, 7, 128]));
    rgba.save(class.join("1-rgba.png")).unwrap();
    let deep: ImageBuffer<Luma<u16>, Vec<u16>> =
        ImageBuffer::from_fn(2, 2, |x, y| Luma([((x + 2 * y) * 0x5555) as u16]));
    deep.save(class.join("2-grey16.png")).unwrap();

    let set = load(dir.path()).unwrap();
    let colour = &set.images[0];
    assert_eq!(colour.channels, 3);
    let expected: Vec<u8> = rgba.pixels().flat_map(|p| [p[0], p[1], p[2]]).collect();
    assert_eq!(colour.pixels, expected);
    let grey16 = &set.images[1];
    assert_eq!(grey16.channels, 1);
    // 16-bit samples scale to 8 bits: 0x5555 -> 0x55.
    assert_eq!(grey16.pixels, [0x00, 0x55, 0xAA, 0xFF]);
}

#[test]
fn jpeg_files_decode_with_right_dimensions_and_close_values() {
    let dir = TempDir::new().unwrap();
    let class = class_dir(dir.path(), "jpegs");
    // Flat colours survive JPEG nearly unchanged; noise would not.
    RgbImage::from_pixel(16, 8, Rgb([200, 40, 90]))
        .save(class.join("a.jpg"))
        .unwrap();
    GrayImage::from_pixel(9, 7, Luma([77]))
        .save(class.join("b.JPEG"))
        .unwrap();

    let set = load(dir.path()).unwrap();
    assert_eq!(set.len(), 2);
    let (colour, grey) = (&set.images[0], &set.images[1]);
    assert_eq!((colour.width, colour.height, colour.channels), (16, 8, 3));
    for px in colour.pixels.chunks(3) {
        for (got, want) in px.iter().zip([200u8, 40, 90]) {
            assert!(got.abs_diff(want) <= 6, "{px:?}");
        }
    }
    assert_eq!((grey.width, grey.height, grey.channels), (9, 7, 1));
    assert!(
        grey.pixels.iter().all(|v| v.abs_diff(77) <= 3),
        "{:?}",
        grey.pixels
    );
}

#[test]
fn files_are_decoded_by_content_not_extension() {
    let dir = TempDir::new().unwrap();
    let class = class_dir(dir.path(), "c");
    let g = grey(3, 3, 9);
    g.save(class.join("real.png")).unwrap();
    fs::rename(class.join("real.png"), class.join("named.jpg")).unwrap();
    let set = load(dir.path()).unwrap();
    assert_eq!(set.images[0].pixels, g.into_raw());
}

#[test]
fn hidden_entries_other_extensions_and_root_files_are_skipped() {
    let dir = TempDir::new().unwrap();
    let root = dir.path();
    let class = class_dir(root, "visible");
    grey(2, 2, 1).save(class.join("keep.png")).unwrap();
    grey(2, 2, 2).save(class.join(".hidden.png")).unwrap();
    write(&class, "notes.txt", b"not an image");
    write(&class, "labels.csv", b"a,b");
    fs::create_dir(class.join("nested.png")).unwrap();
    let hidden_class = class_dir(root, ".cache");
    grey(2, 2, 3).save(hidden_class.join("x.png")).unwrap();
    write(root, "README.md", b"root files are not classes");

    let set = load(root).unwrap();
    assert_eq!(set.class_names, ["visible"]);
    assert_eq!(set.len(), 1);
    assert_eq!(set.images[0].pixels, grey(2, 2, 1).into_raw());
}

#[test]
fn a_non_image_with_an_image_extension_is_a_decode_error_naming_it() {
    let dir = TempDir::new().unwrap();
    let class = class_dir(dir.path(), "c");
    grey(2, 2, 1).save(class.join("a.png")).unwrap();
    let bad = write(&class, "b.png", b"this is text, not a PNG");
    let err = load(dir.path()).unwrap_err();
    assert!(
        matches!(&err, DatasetError::Decode { path, .. } if *path == bad),
        "{err:?}"
    );
    assert!(err.to_string().contains("b.png"), "{err}");
}

#[test]
fn a_truncated_png_is_a_decode_error() {
    let dir = TempDir::new().unwrap();
    let class = class_dir(dir.path(), "c");
    let path = class.join("cut.png");
    rgb(20, 20, 4).save(&path).unwrap();
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load(dir.path()).unwrap_err();
    assert!(
        matches!(&err, DatasetError::Decode { path: p, .. } if *p == path),
        "{err:?}"
    );
}

#[test]
fn empty_root_and_empty_class_are_empty_datasets() {
    let dir = TempDir::new().unwrap();
    let err = load(dir.path()).unwrap_err();
    assert!(
        matches!(&err, DatasetError::EmptyDataset { path, .. } if path == dir.path()),
        "{err:?}"
    );

    let full = class_dir(dir.path(), "full");
    grey(2, 2, 1).save(full.join("a.png")).unwrap();
    let empty = class_dir(dir.path(), "empty");
    write(&empty, "readme.txt", b"no images here");
    let err = load(dir.path()).unwrap_err();
    assert!(
        matches!(&err, DatasetError::EmptyDataset { path, .. } if *path == empty),
        "{err:?}"
    );
}

#[test]
fn missing_root_is_io() {
    let dir = TempDir::new().unwrap();
    let missing = dir.path().join("nope");
    let err = load(&missing).unwrap_err();
    assert!(
        matches!(&err, DatasetError::Io { path, .. } if *path == missing),
        "{err:?}"
    );
}

#[test]
fn limits_on_side_classes_images_and_bytes_apply() {
    let dir = TempDir::new().unwrap();
    for (class, seed) in [("a", 1), ("b", 2)] {
        let d = class_dir(dir.path(), class);
        grey(10, 4, seed).save(d.join("x.png")).unwrap();
        grey(3, 3, seed + 10).save(d.join("y.png")).unwrap();
    }
    let check = |limits: Limits, want: &str, value: u64| {
        let err = read_image_folder(dir.path(), &limits).unwrap_err();
        assert!(
            matches!(&err, DatasetError::LimitExceeded { limit, value: v, .. }
                if *limit == want && *v == value),
            "{want}: {err:?}"
        );
    };
    check(
        Limits {
            max_side: 9,
            ..Limits::default()
        },
        "max_side",
        10,
    );
    check(
        Limits {
            max_classes: 1,
            ..Limits::default()
        },
        "max_classes",
        2,
    );
    check(
        Limits {
            max_images: 3,
            ..Limits::default()
        },
        "max_images",
        4,
    );
    check(
        Limits {
            max_total_bytes: 60,
            ..Limits::default()
        },
        "max_total_bytes",
        89,
    );
    assert_eq!(
        read_image_folder(dir.path(), &Limits::default())
            .unwrap()
            .len(),
        4
    );
}

#[test]
fn corrupted_image_bytes_never_panic() {
    let dir = TempDir::new().unwrap();
    let class = class_dir(dir.path(), "c");
    let path = class.join("f.png");
    let jpeg_path = class.join("f.jpg");
    rgb(12, 9, 5).save(&path).unwrap();
    rgb(12, 9, 6).save(&jpeg_path).unwrap();
    let png = fs::read(&path).unwrap();
    let jpeg = fs::read(&jpeg_path).unwrap();
    fs::remove_file(&jpeg_path).unwrap();
    let mut rng = Bytes::new(13);
    for round in 0..300 {
        let mut bytes = if round % 2 == 0 {
            png.clone()
        } else {
            jpeg.clone()
        };
        for _ in 0..1 + rng.next_u64() % 4 {
            let at = (rng.next_u64() % bytes.len() as u64) as usize;
            bytes[at] = rng.next_u64() as u8;
        }
        if round % 5 == 0 {
            bytes.truncate((rng.next_u64() % bytes.len() as u64) as usize);
        }
        fs::write(&path, &bytes).unwrap();
        let _ = load(dir.path());
    }
}
