//! How the relay reaches Postgres: the `--database-url` as libpq users write it (a URL or
//! key=value string), TLS with rustls from `sslmode=disable` to `verify-full`, a connect
//! timeout, and everything else tokio-postgres understands (several hosts,
//! `target_session_attrs=read-write`, keepalives).
//!
//! tokio-postgres knows `sslmode` disable/prefer/require only, and no certificate files: the
//! TLS settings are taken out of the string here and turned into a rustls configuration; the
//! rest of the string is handed to tokio-postgres unchanged.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::config::SslMode as PgSslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

/// libpq's `sslmode` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<SslMode, String> {
        Ok(match value {
            "disable" => SslMode::Disable,
            // libpq's "allow" tries plaintext first; TLS when offered is never worse.
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                    "--database-url: sslmode={other} is not one of disable, allow, prefer, \
                     require, verify-ca, verify-full"
                ));
            }
        })
    }
}

/// A parsed `--database-url`: what to connect to and how.
#[derive(Clone)]
pub struct Target {
    pub config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The config may hold a password: never printed.
        f.write_str("Target(<database-url>)")
    }
}

/// The TLS parameters taken out of the connection string.
#[derive(Default)]
struct TlsParams {
    sslmode: Option<String>,
    sslrootcert: Option<String>,
    sslcert: Option<String>,
    sslkey: Option<String>,
}

impl TlsParams {
    /// Takes `key` if it is one of ours; false if it belongs to tokio-postgres.
    fn take(&mut self, key: &str, value: &str) -> bool {
        let slot = match key {
            "sslmode" => &mut self.sslmode,
            "sslrootcert" => &mut self.sslrootcert,
            "sslcert" => &mut self.sslcert,
            "sslkey" => &mut self.sslkey,
            _ => return false,
        };
        *slot = Some(value.to_string());
        true
    }
}

/// How long one connection attempt may take when the string does not say (`connect_timeout`).
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl Target {
    pub fn parse(url: &str) -> Result<Target, String> {
        let (rest, params) = split_tls_params(url)?;
        let mut config: tokio_postgres::Config =
            rest.parse().map_err(|e| format!("--database-url: {e}"))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
        }
        let mode = match params.sslmode.as_deref() {
            Some(m) => SslMode::parse(m)?,
            None => SslMode::Prefer,
        };
        config.ssl_mode(match mode {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Prefer => PgSslMode::Prefer,
            _ => PgSslMode::Require,
        });
        let tls = MakeRustlsConnect::new(client_config(mode, &params)?);
        Ok(Target { config, tls })
    }

    /// One connection, TLS as configured.
    pub async fn connect(
        &self,
    ) -> Result<
        (
            tokio_postgres::Client,
            tokio_postgres::Connection<
                tokio_postgres::Socket,
                <MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<
                    tokio_postgres::Socket,
                >>::Stream,
            >,
        ),
        tokio_postgres::Error,
    > {
        self.config.connect(self.tls.clone()).await
    }
}

/// Splits the TLS parameters off a URL (`?sslmode=…&…`) or a key=value string.
fn split_tls_params(url: &str) -> Result<(String, TlsParams), String> {
    let mut params = TlsParams::default();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return Ok((url.to_string(), params));
        };
        let kept: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
            .filter(|(k, v)| !params.take(k, v))
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        if kept.is_empty() {
            return Ok((base.to_string(), params));
        }
        let query = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(kept)
            .finish();
        return Ok((format!("{base}?{query}"), params));
    }
    let mut kept = Vec::new();
    for (key, value) in key_values(url)? {
        if !params.take(&key, &value) {
            kept.push(format!(
                "{key}='{}'",
                value.replace('\\', "\\\\").replace('\'', "\\'")
            ));
        }
    }
    Ok((kept.join(" "), params))
}

/// The pairs of a libpq key=value string: `key = value`, values optionally single-quoted with
/// backslash escapes.
fn key_values(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut pairs = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(format!(
                "--database-url: '{key}' has no value (expected key=value pairs or a postgresql:// URL)"
            ));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\\') => value.extend(chars.next()),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => {
                        return Err(format!(
                            "--database-url: the quoted value of '{key}' is not closed"
                        ));
                    }
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
}

fn read_certs(what: &str, path: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect())
        .map_err(|e| {
            format!("--database-url: {what}={path}: cannot read a PEM certificate: {e}")
        })?;
    if certs.is_empty() {
        return Err(format!(
            "--database-url: {what}={path} holds no PEM certificate"
        ));
    }
    Ok(certs)
}

/// The rustls configuration for `mode`, as libpq would verify: `prefer`/`require` encrypt and
/// check nothing (with `sslrootcert`, `require` verifies the chain like `verify-ca`),
/// `verify-ca` checks the chain against `sslrootcert`, `verify-full` also the host name.
fn client_config(mode: SslMode, params: &TlsParams) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = match (&params.sslrootcert, mode) {
        (Some(path), _) => {
            let mut store = rustls::RootCertStore::empty();
            for cert in read_certs("sslrootcert", path)? {
                store
                    .add(cert)
                    .map_err(|e| format!("--database-url: sslrootcert={path}: {e}"))?;
            }
            Some(Arc::new(store))
        }
        (None, SslMode::VerifyCa | SslMode::VerifyFull) => {
            return Err(
                "--database-url: sslmode=verify-ca and verify-full need sslrootcert=<PEM file of the CA>"
                    .to_string(),
            );
        }
        (None, _) => None,
    };
    let chain = match roots {
        Some(roots) if mode != SslMode::Prefer => Some(
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| format!("--database-url: sslrootcert: {e}"))?,
        ),
        _ => None,
    };
    let verifier = Arc::new(Verifier {
        chain,
        check_name: mode == SslMode::VerifyFull,
        provider: provider.clone(),
    });
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("--database-url: TLS: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    match (&params.sslcert, &params.sslkey) {
        (Some(cert), Some(key)) => {
            let certs = read_certs("sslcert", cert)?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("--database-url: sslkey={key}: cannot read a PEM key: {e}"))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| format!("--database-url: sslcert/sslkey: {e}"))
        }
        (None, None) => Ok(builder.with_no_client_auth()),
        _ => Err("--database-url: sslcert and sslkey go together".to_string()),
    }
}

/// Checks the server's certificate chain (when there is one to check against) and, for
/// `verify-full`, its name; signatures are always checked, so the peer holds the key.
#[derive(Debug)]
struct Verifier {
    chain: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    check_name: bool,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_are_taken_out_of_both_forms() {
        let (rest, p) = split_tls_params(
            "host=a,b port=5432,5433 user='o\\'brien' sslmode=verify-full sslrootcert=/ca.pem \
             target_session_attrs=read-write",
        )
        .expect("key=value");
        assert_eq!(
            rest,
            "host='a,b' port='5432,5433' user='o\\'brien' target_session_attrs='read-write'"
        );
        assert_eq!(
            (p.sslmode.as_deref(), p.sslrootcert.as_deref()),
            (Some("verify-full"), Some("/ca.pem"))
        );
        let (rest, p) = split_tls_params(
            "postgresql://u@a:5432,b:5433/q?sslmode=require&connect_timeout=3&sslcert=%2Fc.pem&sslkey=k",
        )
        .expect("url");
        assert_eq!(rest, "postgresql://u@a:5432,b:5433/q?connect_timeout=3");
        assert_eq!(
            (
                p.sslmode.as_deref(),
                p.sslcert.as_deref(),
                p.sslkey.as_deref()
            ),
            (Some("require"), Some("/c.pem"), Some("k"))
        );
        assert!(split_tls_params("host=a user").is_err());
        assert!(split_tls_params("host='a").is_err());
    }

    #[test]
    fn bad_tls_settings_name_the_parameter() {
        let err = |url: &str| Target::parse(url).err().unwrap_or_default();
        assert!(err("host=a sslmode=maybe").contains("sslmode=maybe"));
        assert!(err("host=a sslmode=verify-full").contains("need sslrootcert"));
        assert!(
            err("host=a sslmode=require sslrootcert=/nonexistent")
                .contains("sslrootcert=/nonexistent")
        );
        assert!(err("host=a sslcert=/c.pem").contains("sslcert and sslkey go together"));
        assert!(Target::parse("host=a sslmode=disable").is_ok());
    }
}
