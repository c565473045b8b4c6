//! Certificates for a lab cluster, made with rcgen: a CA, and for each host a key and a
//! certificate for its host name. Production brings its own PEM files instead.

use std::ops::Range;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

/// A cluster CA that can issue host certificates.
#[derive(Debug)]
pub struct ClusterCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

/// A host's key and certificate, PEM.
#[derive(Debug, Clone)]
pub struct HostCert {
    /// The certificate.
    pub cert_pem: String,
    /// The private key.
    pub key_pem: String,
}

/// How long lab certificates are valid, in days from now.
pub const LAB_VALIDITY_DAYS: Range<i64> = -1..825;

fn validity(params: &mut CertificateParams, days: &Range<i64>) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now + Duration::days(days.start);
    params.not_after = now + Duration::days(days.end);
}

impl ClusterCa {
    /// A new CA named after `cluster`.
    pub fn generate(cluster: &str) -> Result<Self, rcgen::Error> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("Ferry cluster CA ({cluster})"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut params, &(-1..3650));
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA key, PEM.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// The identity of host `name` with a fresh certificate of this CA for `cert_for`
    /// (normally `name` itself), valid over `days`, accepting peers named in `hosts`: for
    /// tests and labs, without files.
    pub fn host_identity(
        &self,
        name: &str,
        cert_for: &str,
        days: Range<i64>,
        hosts: &[String],
    ) -> Result<super::HostTls, String> {
        let cert = self.issue(cert_for, days).map_err(|e| e.to_string())?;
        super::HostTls::from_pem(
            name,
            (
                self.cert_pem.as_bytes(),
                cert.cert_pem.as_bytes(),
                cert.key_pem.as_bytes(),
            ),
            hosts,
        )
        .map_err(|e| e.to_string())
    }

    /// A certificate for host `name`, valid over `days` (relative to now) — a range in the
    /// past makes an expired one.
    pub fn issue(&self, name: &str, days: Range<i64>) -> Result<HostCert, rcgen::Error> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![name.to_string()])?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        validity(&mut params, &days);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(HostCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}
