//! Settings files that fail loudly. A misspelled key (`[agregation]`) would otherwise be
//! skipped by serde and the run would quietly use the default; here every key nothing reads
//! is an error that names it and the nearest key that would have been read.

use serde::de::DeserializeOwned;

/// Keys of a settings file that nothing reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownKeys(pub Vec<UnknownKey>);

/// One key nothing reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownKey {
    /// Its dotted path (`targets.max_std_raito`).
    pub path: String,
    /// The closest key read at the same place, if one is close.
    pub nearest: Option<String>,
}

impl std::fmt::Display for UnknownKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, key) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "unknown key `{}`", key.path)?;
            if let Some(nearest) = &key.nearest {
                write!(f, " (did you mean `{nearest}`?)")?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for UnknownKeys {}

/// Why a settings table did not become a `T`.
#[derive(Debug)]
pub enum StrictError {
    /// A value has the wrong type or a required key is missing.
    Invalid(toml::de::Error),
    /// Keys nothing reads.
    Unknown(UnknownKeys),
}

impl std::fmt::Display for StrictError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StrictError::Invalid(e) => write!(f, "{e}"),
            StrictError::Unknown(keys) => write!(f, "{keys}"),
        }
    }
}

impl std::error::Error for StrictError {}

/// `table` as a `T`, refusing every key `T` does not read. `known` is a table holding the keys
/// `T` reads (a serialized full configuration): the nearest valid key is looked up in it, at
/// the unknown key's place, else anywhere.
pub fn from_table_strict<T: DeserializeOwned>(
    table: toml::Table,
    known: &toml::Table,
) -> Result<T, StrictError> {
    let mut unread = Vec::new();
    let value = serde_ignored::deserialize(toml::Value::Table(table), |path| {
        unread.push(path.to_string());
    })
    .map_err(StrictError::Invalid)?;
    if unread.is_empty() {
        return Ok(value);
    }
    Err(StrictError::Unknown(UnknownKeys(
        unread
            .into_iter()
            .map(|path| UnknownKey {
                nearest: nearest_key(&path, known),
                path,
            })
            .collect(),
    )))
}

/// The key of `known` closest to the last part of `path`, among the keys of its parent
/// table when `known` has that table, else among all of `known`'s keys at any depth.
fn nearest_key(path: &str, known: &toml::Table) -> Option<String> {
    let mut parts: Vec<&str> = path.split('.').collect();
    let name = parts.pop()?;
    let mut table = Some(known);
    for part in &parts {
        table = table
            .and_then(|t| t.get(*part))
            .and_then(toml::Value::as_table);
    }
    let mut candidates = Vec::new();
    match table {
        Some(t) => candidates.extend(t.keys().cloned()),
        None => collect_keys(known, &mut candidates),
    }
    candidates
        .into_iter()
        .map(|c| (strsim::normalized_damerau_levenshtein(name, &c), c))
        .filter(|(score, _)| *score >= 0.5)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| {
            let prefix = parts.join(".");
            if prefix.is_empty() || table.is_none() {
                c
            } else {
                format!("{prefix}.{c}")
            }
        })
}

fn collect_keys(table: &toml::Table, out: &mut Vec<String>) {
    for (key, value) in table {
        out.push(key.clone());
        if let Some(inner) = value.as_table() {
            collect_keys(inner, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Deserialize, serde::Serialize, Default)]
    #[serde(default)]
    struct Targets {
        max_std_ratio: f64,
    }

    #[derive(Debug, PartialEq, serde::Deserialize, serde::Serialize, Default)]
    #[serde(default)]
    struct Settings {
        aggregation: String,
        rounds: u64,
        targets: Targets,
    }

    fn known() -> toml::Table {
        toml::Table::try_from(Settings::default()).unwrap()
    }

    fn parse(text: &str) -> Result<Settings, StrictError> {
        from_table_strict(toml::from_str(text).unwrap(), &known())
    }

    #[test]
    fn known_keys_parse() {
        let s = parse("aggregation = \"median\"\n[targets]\nmax_std_ratio = 2.0\n").unwrap();
        assert_eq!(s.aggregation, "median");
        assert_eq!(s.targets.max_std_ratio, 2.0);
    }

    #[test]
    fn a_misspelled_key_is_named_with_the_nearest_valid_one() {
        let err = parse("agregation = \"median\"\n").unwrap_err().to_string();
        assert_eq!(
            err,
            "unknown key `agregation` (did you mean `aggregation`?)"
        );
        let err = parse("[targets]\nmax_std_raito = 2.0\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "unknown key `targets.max_std_raito` (did you mean `targets.max_std_ratio`?)"
        );
        let err = parse("[agregation]\nkind = \"mean\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("unknown key `agregation`"), "{err}");
        let err = parse("colour = 3\n").unwrap_err().to_string();
        assert_eq!(err, "unknown key `colour`");
    }

    #[test]
    fn a_wrong_type_is_invalid_not_unknown() {
        assert!(matches!(
            parse("rounds = \"ten\"\n"),
            Err(StrictError::Invalid(_))
        ));
    }
}
