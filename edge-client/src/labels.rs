//! A client's classes matched to the run's by name.
//!
//! Local data numbers its classes its own way: an image folder sorts the class folders it
//! happens to have, so a device without `bird/` would call `cat` class 2 where the run calls it
//! 3. The run's class list (in the welcome) is the one numbering; [`class_map`] translates the
//! local labels into it by name, and a local class the run does not know stops the client
//! before it trains on a wrong label.

use std::sync::Arc;

use wsa::LabelledFeatures;

/// Why local data cannot take part in a run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClassError {
    /// The local data holds a class the run does not list.
    #[error(
        "the local data holds class {name:?}, which this run does not know (its classes: {run}); \
         remove or rename that class's data, or add the class to the run's configuration"
    )]
    UnknownClass {
        /// The local class's name.
        name: String,
        /// The run's classes, listed for the message.
        run: String,
    },
    /// The names given do not match the features' class count.
    #[error("{names} class names for data with {classes} classes")]
    NameCount {
        /// Names given.
        names: usize,
        /// Classes the labels range over.
        classes: usize,
    },
}

/// For each local class index, the run's index of the same name.
pub fn class_map(local: &[String], run: &[String]) -> Result<Vec<u32>, ClassError> {
    local
        .iter()
        .map(|name| {
            run.iter()
                .position(|r| r == name)
                .map(|i| i as u32)
                .ok_or_else(|| ClassError::UnknownClass {
                    name: name.clone(),
                    run: list_for_message(run),
                })
        })
        .collect()
}

/// The first classes of a long list, enough for a person to see what was expected.
fn list_for_message(run: &[String]) -> String {
    const SHOWN: usize = 20;
    let mut listed: Vec<String> = run.iter().take(SHOWN).map(|n| format!("{n:?}")).collect();
    if run.len() > SHOWN {
        listed.push(format!("… {} more", run.len() - SHOWN));
    }
    listed.join(", ")
}

/// A client's training rows under its own class numbering, with the names of those classes.
#[derive(Debug, Clone)]
pub struct LocalData {
    features: Arc<LabelledFeatures>,
    class_names: Vec<String>,
}

impl LocalData {
    /// Rows whose label `i` is the class `class_names[i]`.
    pub fn new(
        features: Arc<LabelledFeatures>,
        class_names: Vec<String>,
    ) -> Result<Self, ClassError> {
        if class_names.len() != features.classes() {
            return Err(ClassError::NameCount {
                names: class_names.len(),
                classes: features.classes(),
            });
        }
        Ok(Self {
            features,
            class_names,
        })
    }

    /// Rows whose classes are known only by index: named `"0"`, `"1"`, …, as a run that names
    /// none.
    pub fn indexed(features: Arc<LabelledFeatures>) -> Self {
        let class_names = protocol::indexed_classes(features.classes());
        Self {
            features,
            class_names,
        }
    }

    /// The local class names, by local label.
    pub fn class_names(&self) -> &[String] {
        &self.class_names
    }

    /// The rows, under local labels.
    pub fn features(&self) -> &Arc<LabelledFeatures> {
        &self.features
    }

    /// Rows held.
    pub fn len(&self) -> usize {
        self.features.len()
    }

    /// Never true for data that trains.
    pub fn is_empty(&self) -> bool {
        self.features.is_empty()
    }

    /// The rows relabelled by `map` (from [`class_map`]) into a run of `run_classes`; the rows
    /// themselves are shared when nothing changes.
    pub fn relabel(&self, map: &[u32], run_classes: usize) -> wsa::Result<Arc<LabelledFeatures>> {
        let identity = map.iter().enumerate().all(|(i, &m)| i as u32 == m);
        if identity && run_classes == self.features.classes() {
            return Ok(Arc::clone(&self.features));
        }
        let labels = self
            .features
            .labels()
            .iter()
            .map(|&y| map.get(y as usize).copied().unwrap_or(u32::MAX))
            .collect();
        LabelledFeatures::new(self.features.x().to_owned(), labels, run_classes).map(Arc::new)
    }
}

impl From<Arc<LabelledFeatures>> for LocalData {
    fn from(features: Arc<LabelledFeatures>) -> Self {
        Self::indexed(features)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn local_classes_take_the_run_index_of_their_name() {
        let run = names(&["airplane", "bird", "cat", "dog"]);
        assert_eq!(class_map(&names(&["cat", "dog"]), &run).unwrap(), [2, 3]);
        assert_eq!(class_map(&names(&["bird"]), &run).unwrap(), [1]);
        let err = class_map(&names(&["cat", "horse"]), &run).unwrap_err();
        assert!(err.to_string().contains("\"horse\""), "{err}");
    }

    #[test]
    fn relabelled_rows_keep_their_features() {
        let x = ndarray::array![[1.0f32, 0.0], [0.0, 1.0], [2.0, 2.0]];
        let features = Arc::new(LabelledFeatures::new(x.clone(), vec![0, 1, 0], 2).unwrap());
        let local = LocalData::new(features, names(&["cat", "dog"])).unwrap();
        let run = names(&["bird", "cat", "dog"]);
        let relabelled = local
            .relabel(&class_map(local.class_names(), &run).unwrap(), run.len())
            .unwrap();
        assert_eq!(relabelled.labels(), [1, 2, 1]);
        assert_eq!(relabelled.classes(), 3);
        assert_eq!(relabelled.x(), x.view());
    }
}
