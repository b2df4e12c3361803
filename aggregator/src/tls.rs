//! Credentials and their life: a private CA, the server certificate and per-client tokens
//! (`gen-certs`), then one client added or revoked at a time, and the server certificate
//! renewed before it expires, without touching anything else.
//!
//! Two folders: the credentials folder `serve` reads (the CA certificate clients pin, the
//! server certificate and key, the registry of token hashes, the tokens to hand out), and the
//! CA folder with the CA's private key, needed only to issue server certificates: keep it off
//! the aggregator host. Secrets are written mode 0600, whatever mode a file had before.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use ring::rand::{SecureRandom, SystemRandom};

use crate::auth::{ClientEntry, Registry};

/// Where things are, relative to the credentials folder (and the CA folder).
pub mod layout {
    /// The CA certificate clients pin.
    pub const CA_CERT: &str = "ca.pem";
    /// The CA key, in the CA folder (keep offline; needed only to issue server certificates).
    pub const CA_KEY: &str = "ca.key.pem";
    /// The server certificate chain.
    pub const SERVER_CERT: &str = "server.pem";
    /// The server key.
    pub const SERVER_KEY: &str = "server.key.pem";
    /// The aggregator's client registry (token hashes only).
    pub const REGISTRY: &str = "clients.json";
    /// Per-client secret tokens, `clients/<id>.token`.
    pub const CLIENT_DIR: &str = "clients";
    /// A simulated fleet's key that every client's token is derived from
    /// ([`super::Tokens::Derived`]), instead of a token file per client.
    pub const DERIVED_TOKEN_KEY: &str = "clients/derived-tokens.key";
}

/// How the clients' tokens are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tokens {
    /// A random token per client, in its own file to hand to the device.
    Random,
    /// Each token derived from one random key, HMAC-SHA256(key, id) ([`derived_token`]): a
    /// simulated fleet of millions needs no file per client, and a worker holding the key
    /// can act as any of them. Not for real devices: the key opens every client.
    Derived,
}

/// The token of client `id` under a derived-token `key`, hex.
pub fn derived_token(key: &[u8], id: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    hex::encode(ring::hmac::sign(&key, id.as_bytes()).as_ref())
}

/// Reads the derived-token key of a credentials folder made with [`Tokens::Derived`].
pub fn read_derived_key(creds: &Path) -> Result<Vec<u8>> {
    let path = creds.join(layout::DERIVED_TOKEN_KEY);
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    hex::decode(text.trim()).with_context(|| format!("{} is not hex", path.display()))
}

/// The token of client `id` under the credentials folder `creds`: its token file, or, in a
/// folder of derived tokens, derived from the folder's key.
pub fn client_token(creds: &Path, id: &str) -> Result<Vec<u8>> {
    let file = token_path(creds, id);
    if creds.join(layout::DERIVED_TOKEN_KEY).exists() && !file.exists() {
        return Ok(derived_token(&read_derived_key(creds)?, id).into_bytes());
    }
    Ok(fs::read_to_string(&file)
        .with_context(|| format!("reading {}", file.display()))?
        .trim()
        .as_bytes()
        .to_vec())
}

/// How long certificates last: the CA ten years, the server's one (renew it with
/// [`renew_server_certificate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetimes {
    /// Days the CA certificate is valid.
    pub ca_days: u32,
    /// Days a server certificate is valid.
    pub server_days: u32,
}

impl Default for Lifetimes {
    fn default() -> Self {
        Self {
            ca_days: 3650,
            server_days: 365,
        }
    }
}

/// The path of a client's token file under a credentials folder.
pub fn token_path(dir: &Path, client_id: &str) -> PathBuf {
    dir.join(layout::CLIENT_DIR)
        .join(format!("{client_id}.token"))
}

/// The CA folder that goes with a credentials folder by default: its sibling `<name>-ca`.
pub fn default_ca_dir(creds: &Path) -> PathBuf {
    let name = creds
        .file_name()
        .map_or_else(|| "creds".into(), |n| n.to_string_lossy().into_owned());
    creds.with_file_name(format!("{name}-ca"))
}

/// The CA's identity: the same every time, so a server certificate issued later names the
/// CA the clients pin.
fn ca_params(days: u32) -> Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "wsa-fl private CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    valid_for(&mut params, days);
    Ok(params)
}

/// From now (less a day for skewed clocks) for `days`.
fn valid_for(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(i64::from(days));
}

/// A server certificate for `server_names` (DNS names or IP addresses) signed by the CA; the
/// chain (server then CA) and the new key, PEM.
fn server_certificate(
    server_names: &[String],
    ca_key: &KeyPair,
    ca_pem: &str,
    days: u32,
) -> Result<(String, String)> {
    let issuer = Issuer::new(ca_params(days)?, ca_key);
    let server_key = KeyPair::generate()?;
    let mut params = CertificateParams::new(server_names.to_vec())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "wsa-fl aggregator");
    valid_for(&mut params, days);
    let cert = params.signed_by(&server_key, &issuer)?;
    Ok((cert.pem() + ca_pem, server_key.serialize_pem()))
}

/// Makes a private CA (its key in `ca_dir`), a server certificate for `server_names` and a
/// token per client under `out`. Refuses when `out` or `ca_dir` already holds credentials,
/// since new ones lock out every deployed device; `force` replaces them all.
pub fn generate_credentials(
    out: &Path,
    ca_dir: &Path,
    server_names: &[String],
    client_ids: &[String],
    lifetimes: Lifetimes,
    force: bool,
) -> Result<()> {
    generate_credentials_with(
        out,
        ca_dir,
        server_names,
        client_ids,
        lifetimes,
        force,
        Tokens::Random,
    )
}

/// [`generate_credentials`] with the clients' tokens made as `tokens` says.
pub fn generate_credentials_with(
    out: &Path,
    ca_dir: &Path,
    server_names: &[String],
    client_ids: &[String],
    lifetimes: Lifetimes,
    force: bool,
    tokens: Tokens,
) -> Result<()> {
    for id in client_ids {
        crate::auth::check_client_id(id)?;
    }
    let existing: Vec<PathBuf> = [
        out.join(layout::CA_CERT),
        out.join(layout::REGISTRY),
        out.join(layout::SERVER_KEY),
        ca_dir.join(layout::CA_KEY),
    ]
    .into_iter()
    .filter(|p| p.exists())
    .collect();
    if !existing.is_empty() && !force {
        bail!(
            "credentials exist ({}): new ones would lock out every deployed device. Add or \
             revoke one client with add-client/revoke-client, renew the server certificate \
             with renew-server-cert, or pass --force to replace everything",
            existing
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for dir in [out.join(layout::CLIENT_DIR), ca_dir.to_owned()] {
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if force {
        // Tokens of clients not in the new set would otherwise lie around, valid-looking.
        let _ = fs::remove_dir_all(out.join(layout::CLIENT_DIR));
        fs::create_dir_all(out.join(layout::CLIENT_DIR))?;
    }

    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params(lifetimes.ca_days)?.self_signed(&ca_key)?;
    let (chain, server_key) =
        server_certificate(server_names, &ca_key, &ca_cert.pem(), lifetimes.server_days)?;
    write_file(&out.join(layout::CA_CERT), ca_cert.pem().as_bytes(), false)?;
    write_file(
        &ca_dir.join(layout::CA_CERT),
        ca_cert.pem().as_bytes(),
        false,
    )?;
    write_file(
        &ca_dir.join(layout::CA_KEY),
        ca_key.serialize_pem().as_bytes(),
        true,
    )?;
    write_file(&out.join(layout::SERVER_CERT), chain.as_bytes(), false)?;
    write_file(&out.join(layout::SERVER_KEY), server_key.as_bytes(), true)?;

    let mut entries = Vec::with_capacity(client_ids.len());
    match tokens {
        Tokens::Random => {
            for id in client_ids {
                entries.push(ClientEntry::new(id, new_token(out, id)?.as_bytes()));
            }
        }
        Tokens::Derived => {
            let mut key = [0u8; 32];
            SystemRandom::new()
                .fill(&mut key)
                .map_err(|_| anyhow::anyhow!("system randomness unavailable"))?;
            write_file(
                &out.join(layout::DERIVED_TOKEN_KEY),
                hex::encode(key).as_bytes(),
                true,
            )?;
            for id in client_ids {
                entries.push(ClientEntry::new(id, derived_token(&key, id).as_bytes()));
            }
        }
    }
    Registry::new(entries)?.save(&out.join(layout::REGISTRY))
}

/// Issues a new server certificate (and key) for `server_names` with the CA in `ca_dir`,
/// replacing the one in `creds`; clients keep their tokens and the CA they pin. Restart the
/// aggregator to serve it.
pub fn renew_server_certificate(
    creds: &Path,
    ca_dir: &Path,
    server_names: &[String],
    days: u32,
) -> Result<()> {
    let read =
        |p: PathBuf| fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()));
    let ca_key = KeyPair::from_pem(&read(ca_dir.join(layout::CA_KEY))?)
        .context("the CA key does not parse")?;
    let ca_pem = read(ca_dir.join(layout::CA_CERT))?;
    if read(creds.join(layout::CA_CERT))? != ca_pem {
        bail!(
            "{} is not the CA of {}: its clients would not trust the new certificate",
            ca_dir.display(),
            creds.display()
        );
    }
    let (chain, key) = server_certificate(server_names, &ca_key, &ca_pem, days)?;
    write_file(&creds.join(layout::SERVER_KEY), key.as_bytes(), true)?;
    write_file(&creds.join(layout::SERVER_CERT), chain.as_bytes(), false)
}

/// Registers one new client: a token in `clients/<id>.token` (to hand to the device) and its
/// hash in the registry. Refuses an id already registered.
pub fn add_client(creds: &Path, id: &str) -> Result<PathBuf> {
    crate::auth::check_client_id(id)?;
    let path = creds.join(layout::REGISTRY);
    let mut registry = Registry::load(&path)?;
    if registry.contains(id) {
        bail!("client {id} is registered already (revoke-client first to replace its token)");
    }
    let token = new_token(creds, id)?;
    registry.insert(ClientEntry::new(id, token.as_bytes()))?;
    registry.save(&path)?;
    Ok(token_path(creds, id))
}

/// Removes one client from the registry and deletes its token file. A running aggregator
/// follows the registry: the client's session ends at its next task and its next hello is
/// refused.
pub fn revoke_client(creds: &Path, id: &str) -> Result<()> {
    let path = creds.join(layout::REGISTRY);
    let mut registry = Registry::load(&path)?;
    if !registry.remove(id) {
        bail!("client {id} is not registered");
    }
    registry.save(&path)?;
    match fs::remove_file(token_path(creds, id)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("deleting {}", token_path(creds, id).display()))
        }
        _ => Ok(()),
    }
}

/// A fresh 256-bit token for `id`, written (mode 0600) to its token file; the token, hex.
fn new_token(creds: &Path, id: &str) -> Result<String> {
    let mut token = [0u8; 32];
    SystemRandom::new()
        .fill(&mut token)
        .map_err(|_| anyhow::anyhow!("system randomness unavailable"))?;
    let token = hex::encode(token);
    write_file(&token_path(creds, id), token.as_bytes(), true)?;
    Ok(token)
}

/// Writes `bytes` to `path` atomically; a secret is readable by its owner only.
fn write_file(path: &Path, bytes: &[u8], secret: bool) -> Result<()> {
    if secret {
        support::fs::write_private(path, bytes)
    } else {
        support::fs::write_atomic(path, bytes)
    }
    .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        vec!["localhost".into()]
    }

    #[test]
    fn gen_certs_refuses_to_overwrite_and_keeps_the_ca_key_apart() {
        let dir = tempfile::tempdir().unwrap();
        let (creds, ca) = (dir.path().join("creds"), dir.path().join("creds-ca"));
        assert_eq!(default_ca_dir(&creds), ca);
        let ids = vec!["a".to_string()];
        generate_credentials(&creds, &ca, &names(), &ids, Lifetimes::default(), false).unwrap();
        assert!(ca.join(layout::CA_KEY).exists());
        assert!(
            !creds.join(layout::CA_KEY).exists(),
            "serve never reads the CA key"
        );
        let token = fs::read(token_path(&creds, "a")).unwrap();
        let again = generate_credentials(&creds, &ca, &names(), &ids, Lifetimes::default(), false);
        assert!(again.unwrap_err().to_string().contains("lock out"));
        assert_eq!(
            fs::read(token_path(&creds, "a")).unwrap(),
            token,
            "untouched"
        );
        generate_credentials(&creds, &ca, &names(), &ids, Lifetimes::default(), true).unwrap();
        assert_ne!(
            fs::read(token_path(&creds, "a")).unwrap(),
            token,
            "replaced"
        );
    }

    #[test]
    fn derived_tokens_need_no_file_per_client_and_only_the_key_opens_them() {
        let dir = tempfile::tempdir().unwrap();
        let (creds, ca) = (dir.path().join("creds"), dir.path().join("ca"));
        let ids: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        generate_credentials_with(
            &creds,
            &ca,
            &names(),
            &ids,
            Lifetimes::default(),
            false,
            Tokens::Derived,
        )
        .unwrap();
        assert!(!token_path(&creds, &ids[0]).exists());
        let registry = Registry::load(&creds.join(layout::REGISTRY)).unwrap();
        assert_eq!(registry.len(), ids.len());
        for id in &ids {
            let token = client_token(&creds, id).unwrap();
            assert!(registry.verify(id, &protocol::Auth::Token(token)).is_ok());
        }
        // Another key's token for the same id is refused, and one id's token opens no other.
        let other = derived_token(&[7; 32], &ids[0]).into_bytes();
        assert!(
            registry
                .verify(&ids[0], &protocol::Auth::Token(other))
                .is_err()
        );
        let first = client_token(&creds, &ids[0]).unwrap();
        assert!(
            registry
                .verify(&ids[1], &protocol::Auth::Token(first))
                .is_err()
        );
    }

    #[test]
    fn clients_are_added_and_revoked_one_at_a_time_with_private_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let (creds, ca) = (dir.path().join("creds"), dir.path().join("ca"));
        let ids = vec!["a".to_string(), "b".to_string()];
        generate_credentials(&creds, &ca, &names(), &ids, Lifetimes::default(), false).unwrap();
        let a = fs::read(token_path(&creds, "a")).unwrap();
        let path = add_client(&creds, "c").unwrap();
        assert!(add_client(&creds, "c").is_err(), "registered already");
        assert!(add_client(&creds, "../x").is_err());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let registry = Registry::load(&creds.join(layout::REGISTRY)).unwrap();
        let c = fs::read(&path).unwrap();
        assert!(registry.verify("c", &protocol::Auth::Token(c)).is_ok());
        assert!(
            registry
                .verify("a", &protocol::Auth::Token(a.clone()))
                .is_ok()
        );
        revoke_client(&creds, "b").unwrap();
        assert!(revoke_client(&creds, "b").is_err());
        let registry = Registry::load(&creds.join(layout::REGISTRY)).unwrap();
        assert!(
            registry
                .verify("b", &protocol::Auth::Token(vec![1]))
                .is_err()
        );
        assert!(!token_path(&creds, "b").exists());
        assert_eq!(
            fs::read(token_path(&creds, "a")).unwrap(),
            a,
            "the others untouched"
        );
    }

    #[test]
    fn a_renewed_server_certificate_chains_to_the_same_ca() {
        let dir = tempfile::tempdir().unwrap();
        let (creds, ca) = (dir.path().join("creds"), dir.path().join("ca"));
        generate_credentials(&creds, &ca, &names(), &[], Lifetimes::default(), false).unwrap();
        let before = fs::read_to_string(creds.join(layout::SERVER_CERT)).unwrap();
        renew_server_certificate(&creds, &ca, &names(), 30).unwrap();
        let after = fs::read_to_string(creds.join(layout::SERVER_CERT)).unwrap();
        assert_ne!(before, after);
        // The server config builds from it and its chain ends in the pinned CA.
        let _ = rustls::crypto::ring::default_provider().install_default();
        protocol::quic::server_config(
            &creds.join(layout::SERVER_CERT),
            &creds.join(layout::SERVER_KEY),
            &protocol::quic::QuicLimits::default(),
        )
        .unwrap();
        assert!(after.ends_with(&fs::read_to_string(creds.join(layout::CA_CERT)).unwrap()));
        let other = dir.path().join("other-ca");
        generate_credentials(
            &dir.path().join("x"),
            &other,
            &names(),
            &[],
            Lifetimes::default(),
            false,
        )
        .unwrap();
        assert!(renew_server_certificate(&creds, &other, &names(), 30).is_err());
    }
}
