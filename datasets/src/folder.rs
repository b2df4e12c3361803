//! Image-folder trees: `root/<class name>/<image>.png|jpg|jpeg`.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::BufReader;
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageDecoder, ImageReader};

use crate::{DatasetError, Image, ImageSet, Limits};

const EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// The decoders' own allocation cap must leave room for the largest accepted image at 16-bit
/// RGBA (8 bytes a pixel) plus working buffers, whatever `max_side` is set to.
const MIN_DECODER_ALLOC: u64 = 64 << 20;

/// Reads an image-folder tree: each subfolder of `root` is a class named after it, and holds
/// that class's images as `.png`, `.jpg` or `.jpeg` files (extension in any case).
///
/// Classes are sorted by name and images by file name, so labels and order do not depend on
/// the file system. Names starting with `.` are skipped, as are files with other extensions and
/// plain files directly under `root`. Grey images (with or without alpha) come back with one
/// channel, all others as RGB; alpha is dropped, not composited. A file is decoded by its
/// content, so a PNG named `.jpg` loads. Every class must hold at least one image.
pub fn read_image_folder(root: &Path, limits: &Limits) -> Result<ImageSet, DatasetError> {
    let class_names = list_classes(root, limits)?;
    let mut files = Vec::new();
    for (label, name) in class_names.iter().enumerate() {
        let dir = root.join(name);
        let before = files.len();
        list_images(&dir, label as u32, limits, &mut files)?;
        if files.len() == before {
            return Err(DatasetError::EmptyDataset {
                path: dir,
                reason: "this class folder holds no .png, .jpg or .jpeg files",
            });
        }
    }

    let mut set = ImageSet {
        images: Vec::with_capacity(files.len()),
        labels: Vec::with_capacity(files.len()),
        class_names,
    };
    let mut total_bytes = 0u64;
    for (path, label) in files {
        let image = read_image(&path, limits)?;
        total_bytes = total_bytes.saturating_add(image.pixels.len() as u64);
        if total_bytes > limits.max_total_bytes {
            return Err(DatasetError::LimitExceeded {
                path: root.to_owned(),
                limit: "max_total_bytes",
                value: total_bytes,
                max: limits.max_total_bytes,
            });
        }
        set.images.push(image);
        set.labels.push(label);
    }
    Ok(set)
}

fn list_classes(root: &Path, limits: &Limits) -> Result<Vec<String>, DatasetError> {
    let mut names = Vec::new();
    for (name, path) in visible_entries(root)? {
        if !is_dir(&path)? {
            continue;
        }
        let name = name
            .into_string()
            .map_err(|_| DatasetError::NonUtf8Name { path: path.clone() })?;
        names.push(name);
        if names.len() > limits.max_classes {
            return Err(DatasetError::LimitExceeded {
                path: root.to_owned(),
                limit: "max_classes",
                value: names.len() as u64,
                max: limits.max_classes as u64,
            });
        }
    }
    if names.is_empty() {
        return Err(DatasetError::EmptyDataset {
            path: root.to_owned(),
            reason: "no class folders found; expected root/<class name>/<image>.png|jpg|jpeg",
        });
    }
    names.sort();
    Ok(names)
}

/// Appends the class folder's images, sorted by file name, to `files`.
fn list_images(
    dir: &Path,
    label: u32,
    limits: &Limits,
    files: &mut Vec<(PathBuf, u32)>,
) -> Result<(), DatasetError> {
    let mut found = Vec::new();
    for (name, path) in visible_entries(dir)? {
        if !has_image_extension(&path) || is_dir(&path)? {
            continue;
        }
        if files.len() + found.len() >= limits.max_images {
            return Err(DatasetError::LimitExceeded {
                path: dir.to_owned(),
                limit: "max_images",
                value: (files.len() + found.len() + 1) as u64,
                max: limits.max_images as u64,
            });
        }
        found.push((name, path));
    }
    found.sort();
    files.extend(found.into_iter().map(|(_, path)| (path, label)));
    Ok(())
}

/// The folder's entries whose names do not start with `.`.
fn visible_entries(dir: &Path) -> Result<Vec<(OsString, PathBuf)>, DatasetError> {
    let io = |e| DatasetError::io(dir, e);
    let mut entries = Vec::new();
    for entry in fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name();
        if name.as_encoded_bytes().first() != Some(&b'.') {
            entries.push((name, entry.path()));
        }
    }
    Ok(entries)
}

/// Follows symbolic links, since datasets are often assembled from links into other trees.
fn is_dir(path: &Path) -> Result<bool, DatasetError> {
    fs::metadata(path)
        .map(|meta| meta.is_dir())
        .map_err(|e| DatasetError::io(path, e))
}

/// Whether the file name ends in `.png`, `.jpg` or `.jpeg` (any case): what a folder of
/// images is taken to hold.
pub fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|ext| ext.to_str())
        .is_some_and(|ext| {
            EXTENSIONS
                .iter()
                .any(|known| ext.eq_ignore_ascii_case(known))
        })
}

/// Decodes one image file (PNG or JPEG, told apart by content) as [`read_image_folder`] does:
/// grey stays one channel, everything else becomes RGB; `limits.max_side` bounds its sides.
pub fn read_image(path: &Path, limits: &Limits) -> Result<Image, DatasetError> {
    let decode_error = |source| DatasetError::Decode {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(|e| DatasetError::io(path, e))?;
    let mut reader = ImageReader::new(BufReader::new(file))
        .with_guessed_format()
        .map_err(|e| DatasetError::io(path, e))?;
    let side = u64::from(limits.max_side);
    let mut decoder_limits = image::Limits::default();
    decoder_limits.max_alloc = Some((side * side * 16).max(MIN_DECODER_ALLOC));
    reader.limits(decoder_limits);
    let decoder = reader.into_decoder().map_err(decode_error)?;

    let (width, height) = decoder.dimensions();
    if width == 0 || height == 0 {
        return Err(DatasetError::BadDimensions {
            path: path.to_owned(),
            dims: vec![width.into(), height.into()],
            reason: "an image needs at least one row and one column",
        });
    }
    if width.max(height) > limits.max_side {
        return Err(DatasetError::LimitExceeded {
            path: path.to_owned(),
            limit: "max_side",
            value: width.max(height).into(),
            max: limits.max_side.into(),
        });
    }

    let decoded = DynamicImage::from_decoder(decoder).map_err(decode_error)?;
    let (channels, pixels) = if decoded.color().has_color() {
        (3, decoded.into_rgb8().into_raw())
    } else {
        (1, decoded.into_luma8().into_raw())
    };
    Ok(Image {
        width,
        height,
        channels,
        pixels,
    })
}
