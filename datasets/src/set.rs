//! What every loader returns, and the bounds it checks input against.

/// One decoded image: 8-bit samples, row-major, channels interleaved (HWC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Samples per pixel: 1 (grey) or 3 (RGB).
    pub channels: u8,
    /// `height * width * channels` samples; the sample at row `y`, column `x`, channel `c` is at
    /// `(y * width + x) * channels + c`.
    pub pixels: Vec<u8>,
}

/// A labelled set of images; `labels[i]` is the class of `images[i]` and indexes `class_names`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSet {
    /// The images, in the order of the source (file order, record order, or sorted file names).
    pub images: Vec<Image>,
    /// One class index per image, each below `class_names.len()`.
    pub labels: Vec<u32>,
    /// The name of each class, by class index.
    pub class_names: Vec<String>,
}

impl ImageSet {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.images.len()
    }

    /// Whether the set holds no images (no loader returns such a set).
    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        self.class_names.len()
    }
}

/// Bounds on what a loader accepts, checked against headers and folder listings before the
/// data they announce is read, so a corrupt or hostile file fails fast instead of exhausting
/// memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Most images in one set.
    pub max_images: usize,
    /// Longest accepted image side, in pixels.
    pub max_side: u32,
    /// Most classes in one set.
    pub max_classes: usize,
    /// Most bytes of decoded pixels in one set. Needed besides the other three because their
    /// product is far beyond any machine's memory, and a small gzip file can claim it.
    pub max_total_bytes: u64,
}

impl Default for Limits {
    /// Room for ImageNet-scale sets: 2,000,000 images, 4096 px sides, 10,000 classes, 8 GiB of
    /// pixels.
    fn default() -> Self {
        Limits {
            max_images: 2_000_000,
            max_side: 4096,
            max_classes: 10_000,
            max_total_bytes: 8 << 30,
        }
    }
}
