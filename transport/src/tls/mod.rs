//! Mutual TLS between the hosts of a cluster: rustls with the `ring` provider, TLS 1.3 only.
//!
//! Every host has a certificate from the cluster CA for its host name (a DNS subject
//! alternative name). A host accepts a peer only if the peer's certificate chains to the
//! cluster CA, is valid now and names one of the cluster's hosts; the connecting side checks
//! that the certificate it is shown names the host it dialled. Which host a peer is, is then
//! a fact of the handshake: [`PeerIdentity::is`] checks a name a peer claims in a message
//! against it.
//!
//! [`HostTls`] carries one host's configured identity; the control channel uses it through
//! tokio-rustls, the blocking data streams through [`socket::DataSocket`].

pub mod certs;
pub mod socket;

use std::fmt;
use std::io;
use std::path::Path;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    AlertDescription, CertificateError, ClientConfig, CommonState, DigitallySignedStruct,
    DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
};

/// Loading or using a TLS identity failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file cannot be read or holds nothing usable.
    #[error("cannot load {what} from {path}: {reason}")]
    Load {
        /// Which file.
        what: PemFile,
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// rustls refused the combination (a key that does not match its certificate, say).
    #[error("cannot build the TLS configuration: {0}")]
    Config(#[source] rustls::Error),
    /// A host name that cannot be a certificate name.
    #[error("host name {0:?} cannot be checked against a certificate")]
    BadName(String),
}

/// The three PEM files of a host's identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PemFile {
    /// The cluster CA certificate.
    Ca,
    /// This host's certificate chain.
    Cert,
    /// This host's private key.
    Key,
}

impl fmt::Display for PemFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PemFile::Ca => "the CA certificate",
            PemFile::Cert => "this host's certificate",
            PemFile::Key => "this host's key",
        })
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// One host's TLS identity in its cluster: the CA it trusts, its own certificate and key,
/// and the names of the hosts it talks to.
#[derive(Clone)]
pub struct HostTls {
    name: String,
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
}

impl fmt::Debug for HostTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostTls")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Where a host's TLS files are.
#[derive(Debug, Clone, Copy)]
pub struct TlsFiles<'a> {
    /// PEM of the cluster CA certificate.
    pub ca: &'a Path,
    /// PEM of this host's certificate (chain, leaf first).
    pub cert: &'a Path,
    /// PEM of this host's private key.
    pub key: &'a Path,
}

/// Two identities are the same when they are the same loaded configuration.
impl PartialEq for HostTls {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
            && Arc::ptr_eq(&self.client, &other.client)
            && Arc::ptr_eq(&self.server, &other.server)
    }
}

impl Eq for HostTls {}

impl HostTls {
    /// Loads the PEM files of host `name`, which accepts peers named in `hosts`.
    pub fn load(name: &str, files: TlsFiles<'_>, hosts: &[String]) -> Result<Self, TlsError> {
        let path_of = |what| match what {
            PemFile::Ca => files.ca,
            PemFile::Cert => files.cert,
            PemFile::Key => files.key,
        };
        let read = |what| {
            std::fs::read(path_of(what)).map_err(|e| TlsError::Load {
                what,
                path: path_of(what).display().to_string(),
                reason: e.to_string(),
            })
        };
        let (ca, cert, key) = (
            read(PemFile::Ca)?,
            read(PemFile::Cert)?,
            read(PemFile::Key)?,
        );
        Self::from_pem(name, (&ca, &cert, &key), hosts).map_err(|error| match error {
            TlsError::Load { what, reason, .. } => TlsError::Load {
                what,
                path: path_of(what).display().to_string(),
                reason,
            },
            other => other,
        })
    }

    /// Builds the identity of host `name` from PEM text: (CA, certificate chain, key).
    pub fn from_pem(
        name: &str,
        (ca, cert, key): (&[u8], &[u8], &[u8]),
        hosts: &[String],
    ) -> Result<Self, TlsError> {
        let load = |what, reason: String| TlsError::Load {
            what,
            path: "(memory)".into(),
            reason,
        };
        let mut roots = RootCertStore::empty();
        for der in CertificateDer::pem_slice_iter(ca) {
            let der = der.map_err(|e| load(PemFile::Ca, e.to_string()))?;
            roots
                .add(der)
                .map_err(|e| load(PemFile::Ca, e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(load(PemFile::Ca, "no certificate in the file".into()));
        }
        let chain = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| load(PemFile::Cert, e.to_string()))?;
        if chain.is_empty() {
            return Err(load(PemFile::Cert, "no certificate in the file".into()));
        }
        let key =
            PrivateKeyDer::from_pem_slice(key).map_err(|e| load(PemFile::Key, e.to_string()))?;
        for host in hosts.iter().map(String::as_str).chain([name]) {
            ServerName::try_from(host.to_string()).map_err(|_| TlsError::BadName(host.into()))?;
        }
        let roots = Arc::new(roots);
        let provider = provider();
        let server_verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::clone(&roots), Arc::clone(&provider))
                .build()
                .map_err(|e| TlsError::Config(rustls::Error::General(e.to_string())))?;
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), Arc::clone(&provider))
                .build()
                .map_err(|e| TlsError::Config(rustls::Error::General(e.to_string())))?;
        if let Err(error) =
            check_own(name, &chain, &server_verifier).map_err(|e| describe_rustls(&e, true))
        {
            // Starting anyway lets the peers say why they refuse this host, in their logs as
            // in its own; an operator sees the reason on both sides.
            tracing::warn!(host = name, %error, "this host's own certificate will be refused by its peers");
        }
        let client = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Config)?
            .dangerous()
            .with_custom_certificate_verifier(server_verifier)
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .map_err(TlsError::Config)?;
        let mut server = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Config)?
            .with_client_cert_verifier(Arc::new(ClusterVerifier {
                inner: client_verifier,
                hosts: hosts.to_vec(),
            }))
            .with_single_cert(chain, key)
            .map_err(TlsError::Config)?;
        // No resumption: every connection authenticates in full, and no ticket arrives on
        // a data stream after its handshake.
        server.send_tls13_tickets = 0;
        Ok(Self {
            name: name.into(),
            client: Arc::new(client),
            server: Arc::new(server),
        })
    }

    /// This host's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// For connecting to a peer.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        Arc::clone(&self.client)
    }

    /// For accepting a peer.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.server)
    }

    /// The name to verify a peer's certificate against when dialling host `peer`.
    pub fn server_name(peer: &str) -> Result<ServerName<'static>, TlsError> {
        ServerName::try_from(peer.to_string()).map_err(|_| TlsError::BadName(peer.into()))
    }
}

fn check_own(
    name: &str,
    chain: &[CertificateDer<'static>],
    verifier: &WebPkiServerVerifier,
) -> Result<(), rustls::Error> {
    let server_name = ServerName::try_from(name.to_string())
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    verifier
        .verify_server_cert(&chain[0], &chain[1..], &server_name, &[], UnixTime::now())
        .map(|_| ())
}

/// The web PKI check, then: the certificate names a host of the cluster.
#[derive(Debug)]
struct ClusterVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    hosts: Vec<String>,
}

impl ClientCertVerifier for ClusterVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if self.hosts.iter().any(|host| valid_for(end_entity, host)) {
            Ok(ClientCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn valid_for(cert: &CertificateDer<'_>, host: &str) -> bool {
    let Ok(name) = ServerName::try_from(host) else {
        return false;
    };
    webpki::EndEntityCert::try_from(cert)
        .is_ok_and(|cert| cert.verify_is_valid_for_subject_name(&name).is_ok())
}

/// Who the peer of a TLS connection proved to be: its certificate, already verified against
/// the cluster CA and this host's list of hosts.
#[derive(Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    cert: CertificateDer<'static>,
    /// "tls1.3 aes-256-gcm", say.
    pub cipher: String,
}

impl fmt::Debug for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerIdentity")
            .field("cipher", &self.cipher)
            .finish_non_exhaustive()
    }
}

impl PeerIdentity {
    /// The identity a finished handshake established, if the peer showed a certificate.
    pub fn of(state: &CommonState) -> Option<Self> {
        let cert = state.peer_certificates()?.first()?.clone().into_owned();
        Some(Self {
            cert,
            cipher: cipher_label(state),
        })
    }

    /// Whether the certificate is for host `name`.
    pub fn is(&self, name: &str) -> bool {
        valid_for(&self.cert, name)
    }
}

/// The protocol and cipher of a finished handshake, as reports show it.
pub fn cipher_label(state: &CommonState) -> String {
    let version = match state.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "tls1.3".to_string(),
        Some(other) => format!("{other:?}").to_lowercase(),
        None => "tls".to_string(),
    };
    let suite = state
        .negotiated_cipher_suite()
        .map(|s| match s.suite() {
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => "aes-256-gcm".to_string(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => "aes-128-gcm".to_string(),
            rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => "chacha20-poly1305".to_string(),
            other => format!("{other:?}").to_lowercase(),
        })
        .unwrap_or_default();
    format!("{version} {suite}").trim().to_string()
}

/// Words for an operator on why a TLS handshake or stream failed. `ours` says whether the
/// certificate in question is this host's (found by this side) — false for the usual case,
/// the peer's certificate judged here.
pub fn describe_rustls(error: &rustls::Error, ours: bool) -> String {
    use CertificateError as C;
    let whose = if ours { "this host's" } else { "the peer's" };
    match error {
        rustls::Error::InvalidCertificate(cert) => match cert {
            C::UnknownIssuer => format!("{whose} certificate is not signed by this cluster's CA"),
            C::Expired | C::ExpiredContext { .. } => format!("{whose} certificate has expired"),
            C::NotValidYet | C::NotValidYetContext { .. } => {
                format!("{whose} certificate is not valid yet")
            }
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                format!("{whose} certificate is not for the host it was dialled as ({cert})")
            }
            C::ApplicationVerificationFailure => {
                format!("{whose} certificate names no host in this host's cluster configuration")
            }
            other => format!("{whose} certificate is refused: {other}"),
        },
        rustls::Error::NoCertificatesPresented => "the peer presented no certificate".into(),
        rustls::Error::AlertReceived(alert) => {
            let why = match alert {
                AlertDescription::UnknownCA => {
                    "it does not trust the CA that signed this host's certificate (a different cluster CA?)"
                }
                AlertDescription::CertificateExpired => {
                    "it finds this host's certificate expired or not yet valid"
                }
                AlertDescription::AccessDenied => {
                    "this host's certificate names no host in the peer's cluster configuration"
                }
                AlertDescription::BadCertificate => {
                    "it finds this host's certificate invalid or not for this host's name"
                }
                AlertDescription::CertificateRequired => "this host presented no certificate",
                AlertDescription::BadRecordMac => {
                    "a TLS record from this host failed its integrity check there (damaged or forged in transit)"
                }
                _ => "",
            };
            if why.is_empty() {
                format!("the peer ended the TLS handshake: {alert:?}")
            } else {
                format!("the peer refused this host: {why}")
            }
        }
        rustls::Error::DecryptError => {
            "a TLS record failed its integrity check (damaged or forged in transit)".into()
        }
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
            "the peer does not speak TLS here (plaintext on a TLS connection?)".into()
        }
        other => other.to_string(),
    }
}

/// [`describe_rustls`] for the I/O errors rustls reaches callers as.
pub fn describe_io(error: &io::Error) -> String {
    match error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(tls) => describe_rustls(tls, false),
        None if error.kind() == io::ErrorKind::UnexpectedEof => {
            "the peer closed the connection during the TLS handshake".into()
        }
        None => error.to_string(),
    }
}

#[cfg(test)]
mod tests;
