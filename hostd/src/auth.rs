//! Who may use hostd's API. On the unix socket in the state directory (mode 0600), whoever
//! can open it: the host's administrator. On TCP, only a request that carries the host's
//! bearer token (`Authorization: Bearer TOKEN`, compared in constant time); any other gets
//! a 401 with a JSON error, and nothing else happens.

use std::path::Path;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::web::Data;
use actix_web::{Error, HttpResponse};
use anyhow::{Context, Result, bail};
use ferry_actors::host_actor::ErrorKind;
use subtle::ConstantTimeEq;

use crate::api_types::ErrorBody;

/// Shortest token accepted: guessing one must be hopeless.
pub const MIN_TOKEN_LEN: usize = 16;

/// The bearer token of a TCP API.
#[derive(Clone)]
pub struct ApiToken(Vec<u8>);

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiToken(..)")
    }
}

impl ApiToken {
    /// Reads the token from `file` (surrounding whitespace ignored).
    pub fn load(file: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("reading the API token file {}", file.display()))?;
        Self::new(text.trim()).with_context(|| format!("the API token in {}", file.display()))
    }

    /// A token from its text.
    pub fn new(text: &str) -> Result<Self> {
        if text.len() < MIN_TOKEN_LEN {
            bail!(
                "is {} characters long; use at least {MIN_TOKEN_LEN} (e.g. `openssl rand -hex 32`)",
                text.len()
            );
        }
        Ok(Self(text.as_bytes().to_vec()))
    }

    /// The token's text, for a client to send.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }

    /// Whether an `Authorization` header value carries this token.
    pub fn admits(&self, header: Option<&[u8]>) -> bool {
        let Some(presented) = header.and_then(|h| h.strip_prefix(b"Bearer ")) else {
            return false;
        };
        // Constant time in the content; the length of a wrong token may show.
        presented.len() == self.0.len() && bool::from(presented.ct_eq(&self.0))
    }
}

/// Middleware for the TCP API: a request without the token ends here with a 401.
pub async fn require_token(
    request: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, Error> {
    let admitted = request.app_data::<Data<ApiToken>>().is_some_and(|token| {
        token.admits(
            request
                .headers()
                .get(actix_web::http::header::AUTHORIZATION)
                .map(|v| v.as_bytes()),
        )
    });
    if admitted {
        return next
            .call(request)
            .await
            .map(ServiceResponse::map_into_left_body);
    }
    let response = HttpResponse::Unauthorized()
        .insert_header(("WWW-Authenticate", "Bearer"))
        .json(ErrorBody {
            error: "this API needs the host's bearer token: send `Authorization: Bearer TOKEN` (the token is in the file the host's api_token_file names)".into(),
            kind: ErrorKind::Unauthorized,
        });
    Ok(request.into_response(response).map_into_right_body())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_token_is_admitted() {
        let token = ApiToken::new("0123456789abcdef0123").unwrap();
        assert!(token.admits(Some(b"Bearer 0123456789abcdef0123")));
        for wrong in [
            &b"Bearer 0123456789abcdef0124"[..],
            b"Bearer 0123456789abcdef012",
            b"Bearer 0123456789abcdef01234",
            b"bearer 0123456789abcdef0123",
            b"0123456789abcdef0123",
            b"Bearer ",
            b"",
        ] {
            assert!(
                !token.admits(Some(wrong)),
                "{:?}",
                String::from_utf8_lossy(wrong)
            );
        }
        assert!(!token.admits(None));
        assert!(ApiToken::new("short").is_err());
    }
}
