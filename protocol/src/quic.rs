//! QUIC for both ends, behind the `quic` feature: frames over quinn streams, and the TLS
//! setup (TLS 1.3 only, rustls on ring, the deployment's private CA, ALPN [`ALPN`]). The only
//! I/O in this crate.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use quinn::{RecvStream, SendStream};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::ProtocolError;
use crate::frame::{FrameHeader, HEADER_LEN, decode_body, encode_frame};
use crate::limits::Limits;
use crate::message::Message;

/// ALPN id of this protocol; a peer speaking something else fails the handshake.
pub const ALPN: &[u8] = b"wsa-fl/1";

/// Why a message could not be read from or written to a stream.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The peer's bytes were not a valid message.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The stream ended before a whole frame arrived (or was reset).
    #[error("stream read failed: {0}")]
    Read(#[from] quinn::ReadExactError),
    /// The stream could not be written.
    #[error("stream write failed: {0}")]
    Write(#[from] quinn::WriteError),
    /// The stream was already finished or reset.
    #[error("stream closed: {0}")]
    Closed(#[from] quinn::ClosedStream),
}

/// A received message and the bytes its frame took on the stream.
#[derive(Debug)]
pub struct Received {
    /// The message.
    pub message: Message,
    /// Header plus body bytes.
    pub wire_bytes: u64,
}

/// Reads one frame: the header is checked against `limits` before the body is allocated.
pub async fn read_message(recv: &mut RecvStream, limits: &Limits) -> Result<Received, StreamError> {
    let mut header = [0u8; HEADER_LEN];
    recv.read_exact(&mut header).await?;
    let FrameHeader { body_len } = FrameHeader::parse(&header, limits)?;
    let mut body = vec![0u8; body_len];
    recv.read_exact(&mut body).await?;
    Ok(Received {
        message: decode_body(&body, limits)?,
        wire_bytes: (HEADER_LEN + body_len) as u64,
    })
}

/// Writes one frame; returns the bytes written.
pub async fn write_message(send: &mut SendStream, message: &Message) -> Result<u64, StreamError> {
    let frame = encode_frame(message)?;
    send.write_all(&frame).await?;
    Ok(frame.len() as u64)
}

/// Transport limits of the server's QUIC endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QuicLimits {
    /// A connection silent this long is closed.
    pub idle_timeout: Duration,
    /// How often an idle connection is pinged to keep NAT bindings and the idle timer alive.
    pub keep_alive: Duration,
    /// Streams a client may open at once. A client needs one (its control stream); round
    /// streams are opened by the server. Anything more is refused by QUIC flow control.
    pub client_streams: u32,
    /// The UDP receive and send buffers the endpoint's socket asks for, in bytes (the kernel
    /// caps them, on Linux at `net.core.rmem_max` / `wmem_max`); 0 keeps the OS default.
    #[serde(default = "default_udp_buffer")]
    pub udp_buffer: usize,
}

/// 8 MiB: with the OS default (208 KiB on Linux) a 1,000-client f32 run on one machine dropped
/// 591k datagrams (420k with 8 MiB; `docs/benchmarks.md`), and every drop costs a
/// retransmission and a halved congestion window.
fn default_udp_buffer() -> usize {
    8 << 20
}

/// A UDP socket bound to `addr` for a QUIC endpoint, its buffers asked to be `buffer` bytes
/// (0: the OS default). Best effort: Linux caps a request silently, macOS and the BSDs refuse
/// one above their cap, so a refused size is halved until one is taken (or the default
/// kept). Returns the socket and the receive buffer the kernel granted.
pub fn bind_udp(
    addr: std::net::SocketAddr,
    buffer: usize,
) -> std::io::Result<(std::net::UdpSocket, usize)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // As std's bind leaves it on Linux: the unspecified v6 address takes v4 peers too.
        // Some systems are v6-only and refuse; the socket still works for v6.
        let _ = socket.set_only_v6(false);
    }
    let halving = |set: &dyn Fn(usize) -> std::io::Result<()>| {
        let mut size = buffer;
        while size > 0 && set(size).is_err() {
            size = if size > 64 << 10 { size / 2 } else { 0 };
        }
    };
    halving(&|size| socket.set_recv_buffer_size(size));
    halving(&|size| socket.set_send_buffer_size(size));
    socket.bind(&addr.into())?;
    let granted = socket.recv_buffer_size()?;
    Ok((socket.into(), granted))
}

impl Default for QuicLimits {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(60),
            keep_alive: Duration::from_secs(10),
            client_streams: 1,
            udp_buffer: default_udp_buffer(),
        }
    }
}

/// The quinn server config from PEM files: TLS 1.3 only, ALPN [`ALPN`], ring provider.
pub fn server_config(
    cert: &Path,
    key: &Path,
    limits: &QuicLimits,
) -> Result<quinn::ServerConfig, TlsSetupError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|e| TlsSetupError::Pem(cert.display().to_string(), e))?;
    if chain.is_empty() {
        return Err(TlsSetupError::Empty(cert.display().to_string()));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| TlsSetupError::Pem(key.display().to_string(), e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(idle_timeout(limits)?))
        .keep_alive_interval(Some(limits.keep_alive))
        .max_concurrent_bidi_streams(limits.client_streams.into())
        .max_concurrent_uni_streams(0u32.into())
        // The protocol has no datagrams: no buffer for a peer to fill.
        .datagram_receive_buffer_size(None);
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// The quinn client config that trusts only the CA in `ca_cert` (the deployment's private CA).
pub fn client_config(
    ca_cert: &Path,
    limits: &QuicLimits,
) -> Result<quinn::ClientConfig, TlsSetupError> {
    let mut roots = rustls::RootCertStore::empty();
    let pem_error = |e| TlsSetupError::Pem(ca_cert.display().to_string(), e);
    for cert in CertificateDer::pem_file_iter(ca_cert).map_err(pem_error)? {
        roots.add(cert.map_err(pem_error)?)?;
    }
    if roots.is_empty() {
        return Err(TlsSetupError::Empty(ca_cert.display().to_string()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(idle_timeout(limits)?))
        .keep_alive_interval(Some(limits.keep_alive))
        .max_concurrent_uni_streams(0u32.into())
        .datagram_receive_buffer_size(None);
    config.transport_config(Arc::new(transport));
    Ok(config)
}

fn idle_timeout(limits: &QuicLimits) -> Result<quinn::IdleTimeout, TlsSetupError> {
    limits
        .idle_timeout
        .try_into()
        .map_err(|_| TlsSetupError::Config("idle timeout out of range".into()))
}

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// A PEM file could not be read or parsed.
    #[error("{0}: {1}")]
    Pem(String, rustls::pki_types::pem::Error),
    /// A PEM file holds no certificate.
    #[error("no certificate in {0}")]
    Empty(String),
    /// rustls refused the certificates or settings.
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
    /// The TLS config does not suit QUIC.
    #[error("{0}")]
    Config(String),
}

impl From<quinn::crypto::rustls::NoInitialCipherSuite> for TlsSetupError {
    fn from(e: quinn::crypto::rustls::NoInitialCipherSuite) -> Self {
        TlsSetupError::Config(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::bind_udp;

    #[test]
    fn the_socket_gets_the_buffer_asked_for() {
        let local = "127.0.0.1:0".parse().unwrap();
        let (_, default) = bind_udp(local, 0).unwrap();
        // Below any kernel's cap, so granted as asked (Linux doubles it for bookkeeping).
        let (socket, small) = bind_udp(local, 16 << 10).unwrap();
        assert!(
            small < default,
            "asked 16 KiB, granted {small} (default {default})"
        );
        assert!(small >= 16 << 10);
        assert_ne!(socket.local_addr().unwrap().port(), 0);
    }
}
