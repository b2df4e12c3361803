//! Credentials: a private CA, the server certificate and per-client tokens (`gen-certs`).

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use ring::rand::{SecureRandom, SystemRandom};

use crate::auth::{ClientEntry, Registry};

/// Where `gen-certs` puts things, relative to its output folder.
pub mod layout {
    /// The CA certificate clients pin.
    pub const CA_CERT: &str = "ca.pem";
    /// The CA key (keep offline; needed only to issue more server certificates).
    pub const CA_KEY: &str = "ca.key.pem";
    /// The server certificate chain.
    pub const SERVER_CERT: &str = "server.pem";
    /// The server key.
    pub const SERVER_KEY: &str = "server.key.pem";
    /// The aggregator's client registry (token hashes only).
    pub const REGISTRY: &str = "clients.json";
    /// Per-client secret tokens, `clients/<id>.token`.
    pub const CLIENT_DIR: &str = "clients";
}

/// The path of a client's token file under a credentials folder.
pub fn token_path(dir: &Path, client_id: &str) -> PathBuf {
    dir.join(layout::CLIENT_DIR)
        .join(format!("{client_id}.token"))
}

/// Makes a private CA, a server certificate for `server_names` (DNS names or IP addresses)
/// and a token per client; writes them under `out`. Secrets are written mode 0600.
pub fn generate_credentials(
    out: &Path,
    server_names: &[String],
    client_ids: &[String],
) -> Result<()> {
    fs::create_dir_all(out.join(layout::CLIENT_DIR))
        .with_context(|| format!("creating {}", out.display()))?;
    for id in client_ids {
        crate::auth::check_client_id(id)?;
    }

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "wsa-fl private CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, &ca_key);

    let server_key = KeyPair::generate()?;
    let mut server_params = CertificateParams::new(server_names.to_vec())?;
    server_params
        .distinguished_name
        .push(DnType::CommonName, "wsa-fl aggregator");
    let server_cert = server_params.signed_by(&server_key, &issuer)?;

    write_file(&out.join(layout::CA_CERT), ca_cert.pem().as_bytes(), false)?;
    write_file(
        &out.join(layout::CA_KEY),
        ca_key.serialize_pem().as_bytes(),
        true,
    )?;
    write_file(
        &out.join(layout::SERVER_CERT),
        (server_cert.pem() + &ca_cert.pem()).as_bytes(),
        false,
    )?;
    write_file(
        &out.join(layout::SERVER_KEY),
        server_key.serialize_pem().as_bytes(),
        true,
    )?;

    let rng = SystemRandom::new();
    let mut entries = Vec::with_capacity(client_ids.len());
    for id in client_ids {
        let mut token = [0u8; 32];
        rng.fill(&mut token)
            .map_err(|_| anyhow::anyhow!("system randomness unavailable"))?;
        let token_hex = hex::encode(token);
        write_file(&token_path(out, id), token_hex.as_bytes(), true)?;
        entries.push(ClientEntry::new(id, token_hex.as_bytes()));
    }
    Registry::new(entries)?.save(&out.join(layout::REGISTRY))?;
    Ok(())
}

fn write_file(path: &Path, bytes: &[u8], secret: bool) -> Result<()> {
    use std::io::Write;
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let _ = secret;
    let mut file = options
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(bytes)?;
    Ok(())
}
