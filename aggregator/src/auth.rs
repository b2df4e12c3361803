//! Which clients may join, and the check of their tokens. The registry holds sha256 hashes of
//! the tokens only, so a leaked registry file does not let anyone in.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use protocol::RejectReason;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Longest client id; ids are also file names, so they are kept plain.
pub const MAX_CLIENT_ID_LEN: usize = 64;

/// Refuses ids that are empty, long, or not `[A-Za-z0-9._-]` (they name token files).
pub fn check_client_id(id: &str) -> anyhow::Result<()> {
    let plain = id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if id.is_empty() || id.len() > MAX_CLIENT_ID_LEN || !plain || id.starts_with('.') {
        anyhow::bail!(
            "client id {id:?} must be 1–{MAX_CLIENT_ID_LEN} of [A-Za-z0-9._-], not starting with '.'"
        );
    }
    Ok(())
}

/// One registered client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientEntry {
    /// Its id.
    pub id: String,
    /// sha256 of its token, hex.
    pub token_sha256: String,
}

impl ClientEntry {
    /// An entry for `id` whose secret is `token`.
    pub fn new(id: &str, token: &[u8]) -> Self {
        Self {
            id: id.to_owned(),
            token_sha256: hex::encode(Sha256::digest(token)),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct RegistryFile {
    clients: Vec<ClientEntry>,
}

/// The registered clients.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    token_hashes: BTreeMap<String, [u8; 32]>,
}

impl Registry {
    /// A registry of `entries`; ids must be unique and hashes 32 bytes of hex.
    pub fn new(entries: Vec<ClientEntry>) -> anyhow::Result<Self> {
        let mut token_hashes = BTreeMap::new();
        for e in entries {
            check_client_id(&e.id)?;
            let mut hash = [0u8; 32];
            hex::decode_to_slice(&e.token_sha256, &mut hash)
                .map_err(|err| anyhow::anyhow!("client {}: bad token hash: {err}", e.id))?;
            if token_hashes.insert(e.id.clone(), hash).is_some() {
                anyhow::bail!("client {} registered twice", e.id);
            }
        }
        Ok(Self { token_hashes })
    }

    /// Reads a registry file (`clients.json` from `gen-certs`).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        let file: RegistryFile = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("parsing {}: {e}", path.display()))?;
        Self::new(file.clients)
    }

    /// Writes the registry as JSON.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let file = RegistryFile {
            clients: self
                .token_hashes
                .iter()
                .map(|(id, h)| ClientEntry {
                    id: id.clone(),
                    token_sha256: hex::encode(h),
                })
                .collect(),
        };
        // Atomic: a crash mid-write must not leave a registry that locks everyone out.
        support::fs::write_atomic(
            path,
            (serde_json::to_string_pretty(&file)? + "\n").as_bytes(),
        )
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))
    }

    /// True when `client_id` is registered.
    pub fn contains(&self, client_id: &str) -> bool {
        self.token_hashes.contains_key(client_id)
    }

    /// Registers one more client; refuses an id already registered.
    pub fn insert(&mut self, entry: ClientEntry) -> anyhow::Result<()> {
        let mut one = Self::new(vec![entry])?.token_hashes;
        let (id, hash) = one.pop_first().expect("one entry");
        if self.token_hashes.contains_key(&id) {
            anyhow::bail!("client {id} registered twice");
        }
        self.token_hashes.insert(id, hash);
        Ok(())
    }

    /// Unregisters `client_id`; false when it was not registered.
    pub fn remove(&mut self, client_id: &str) -> bool {
        self.token_hashes.remove(client_id).is_some()
    }

    /// The registered ids, sorted.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.token_hashes.keys().map(String::as_str)
    }

    /// Number of clients.
    pub fn len(&self) -> usize {
        self.token_hashes.len()
    }

    /// True when no client is registered.
    pub fn is_empty(&self) -> bool {
        self.token_hashes.is_empty()
    }

    /// Checks a hello's credentials.
    pub fn verify(&self, client_id: &str, auth: &protocol::Auth) -> Result<(), RejectReason> {
        let expected = self
            .token_hashes
            .get(client_id)
            .ok_or(RejectReason::UnknownClient)?;
        let protocol::Auth::Token(token) = auth else {
            // Client certificates are not issued by this deployment.
            return Err(RejectReason::BadCredentials);
        };
        let got: [u8; 32] = Sha256::digest(token).into();
        // Fixed-time compare: the time taken says nothing about how much of the hash matched.
        let diff = expected.iter().zip(&got).fold(0u8, |d, (a, b)| d | (a ^ b));
        if diff == 0 {
            Ok(())
        } else {
            Err(RejectReason::BadCredentials)
        }
    }
}

/// The registry a running server checks: reloaded from its file whenever the file changes
/// (`add-client` and `revoke-client` rewrite it atomically), so a client is admitted or
/// refused without a restart. A file that fails to load keeps the previous registry, with a
/// warning: a botched hand edit must not lock everyone out.
#[derive(Debug)]
pub struct LiveRegistry {
    path: Option<PathBuf>,
    loaded: Mutex<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    registry: Registry,
    /// The file's identity when `registry` was read.
    stamp: Option<Stamp>,
}

impl LiveRegistry {
    /// Starts from `registry`, watching `path` (None: fixed).
    pub fn new(registry: Registry, path: Option<PathBuf>) -> Self {
        let stamp = path.as_deref().and_then(stamp_of);
        Self {
            path,
            loaded: Mutex::new(Loaded { registry, stamp }),
        }
    }

    /// Checks a hello's credentials against the current file.
    pub fn verify(&self, client_id: &str, auth: &protocol::Auth) -> Result<(), RejectReason> {
        self.with_current(|r| r.verify(client_id, auth))
    }

    /// True while `client_id` is registered in the current file.
    pub fn contains(&self, client_id: &str) -> bool {
        self.with_current(|r| r.contains(client_id))
    }

    fn with_current<T>(&self, f: impl FnOnce(&Registry) -> T) -> T {
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(path) = &self.path {
            let stamp = stamp_of(path);
            if stamp.is_some() && stamp != loaded.stamp {
                match Registry::load(path) {
                    Ok(registry) => {
                        tracing::info!(path = %path.display(), clients = registry.len(), "client registry reloaded");
                        loaded.registry = registry;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "client registry unreadable; keeping the previous one");
                    }
                }
                loaded.stamp = stamp;
            }
        }
        f(&loaded.registry)
    }
}

/// What tells one registry file from the next: file times tick coarsely (a jiffy), so two
/// writes of equal length can share them; an atomic rewrite is also a new inode.
type Stamp = (SystemTime, u64, u64);

fn stamp_of(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let inode = 0;
    Some((meta.modified().ok()?, meta.len(), inode))
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::Auth;

    #[test]
    fn a_live_registry_follows_its_file_and_survives_a_bad_edit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clients.json");
        let first = Registry::new(vec![ClientEntry::new("a", b"ta")]).unwrap();
        first.save(&path).unwrap();
        let live = LiveRegistry::new(first.clone(), Some(path.clone()));
        assert!(live.contains("a") && !live.contains("b"));
        let mut second = first.clone();
        second.insert(ClientEntry::new("b", b"tb")).unwrap();
        assert!(second.remove("a"));
        second.save(&path).unwrap();
        assert_eq!(live.verify("b", &Auth::Token(b"tb".to_vec())), Ok(()));
        assert_eq!(
            live.verify("a", &Auth::Token(b"ta".to_vec())),
            Err(RejectReason::UnknownClient)
        );
        std::fs::write(&path, "{ not json").unwrap();
        assert!(live.contains("b"), "the last good registry stays");
    }

    #[test]
    fn only_the_right_token_for_a_registered_id_passes() {
        let reg = Registry::new(vec![ClientEntry::new("a", b"secret-a")]).unwrap();
        assert_eq!(reg.verify("a", &Auth::Token(b"secret-a".to_vec())), Ok(()));
        assert_eq!(
            reg.verify("a", &Auth::Token(b"secret-b".to_vec())),
            Err(RejectReason::BadCredentials)
        );
        assert_eq!(
            reg.verify("b", &Auth::Token(b"secret-a".to_vec())),
            Err(RejectReason::UnknownClient)
        );
        assert_eq!(
            reg.verify("a", &Auth::ClientCertificate),
            Err(RejectReason::BadCredentials)
        );
    }

    #[test]
    fn registry_refuses_bad_entries() {
        assert!(Registry::new(vec![ClientEntry::new("../x", b"t")]).is_err());
        assert!(
            Registry::new(vec![
                ClientEntry::new("a", b"t"),
                ClientEntry::new("a", b"u")
            ])
            .is_err()
        );
        let mut e = ClientEntry::new("a", b"t");
        e.token_sha256.pop();
        assert!(Registry::new(vec![e]).is_err());
    }
}
