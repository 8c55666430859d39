//! Errors shoal answers itself, and the one place they become responses (both paths).

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{Either, Full};

use crate::proxy::ClientBody;

/// Errors shoal answers itself. Client-side ones (4xx) never count against an instance.
#[derive(Debug)]
pub enum ProxyError {
    BadRequest(&'static str),
    /// The client broke its request body (malformed framing, early end, longer than
    /// declared): 400, and counted as a client error, never against an instance.
    BodyFault(&'static str),
    NotFound,
    MethodNotAllowed,
    RequestTimeout,
    UriTooLong,
    HeadersTooLarge,
    PayloadTooLarge,
    NoInstance,
    /// Scaling from zero: no instance became ready in time, or too many requests wait.
    ColdStart,
    Upstream(&'static str),
    Timeout,
    /// 308 to this location (a plain listener's `https_redirect`).
    Redirect(String),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) | ProxyError::BodyFault(_) => StatusCode::BAD_REQUEST,
            ProxyError::NotFound => StatusCode::NOT_FOUND,
            ProxyError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ProxyError::UriTooLong => StatusCode::URI_TOO_LONG,
            ProxyError::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::NoInstance | ProxyError::ColdStart => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Upstream(_) => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Redirect(_) => StatusCode::PERMANENT_REDIRECT,
        }
    }

    /// The short plain-text body of the error response.
    pub fn message(&self) -> &'static str {
        match self {
            ProxyError::BadRequest(m) | ProxyError::BodyFault(m) => m,
            ProxyError::NotFound => "no route for this request",
            ProxyError::MethodNotAllowed => "method not allowed",
            ProxyError::RequestTimeout => "request body timed out",
            ProxyError::UriTooLong => "request target too long",
            ProxyError::HeadersTooLarge => "request header fields too large",
            ProxyError::PayloadTooLarge => "payload too large",
            ProxyError::NoInstance => "no instance available",
            ProxyError::ColdStart => "no instance ready yet: starting one",
            ProxyError::Upstream(m) => m,
            ProxyError::Timeout => "upstream timed out",
            ProxyError::Redirect(_) => "use https",
        }
    }

    /// After these the connection's byte stream cannot be trusted (or the client is too
    /// slow to keep): the answer closes it.
    pub fn closes(&self) -> bool {
        matches!(
            self,
            ProxyError::BadRequest(_)
                | ProxyError::BodyFault(_)
                | ProxyError::RequestTimeout
                | ProxyError::PayloadTooLarge
        )
    }

    /// A request body the client broke or stalled: `shoal_client_errors_total`.
    pub fn client_fault(&self) -> bool {
        matches!(self, ProxyError::BodyFault(_) | ProxyError::RequestTimeout)
    }

    /// The response for the general path.
    pub fn into_response(self) -> Response<ClientBody> {
        let msg = self.message();
        let status = self.status();
        let mut r = Response::new(Either::Right(Full::new(Bytes::from(format!("{msg}\n")))));
        *r.status_mut() = status;
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if self.closes() {
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let ProxyError::Redirect(to) = &self {
            if let Ok(v) = HeaderValue::from_str(to) {
                h.insert(header::LOCATION, v);
            }
        }
        if matches!(self, ProxyError::ColdStart) {
            h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }

    /// The same response as bytes, for the fast path.
    pub(crate) fn write(&self, out: &mut Vec<u8>, close: bool) {
        let msg = self.message();
        let status = self.status();
        status_line(out, status);
        out.extend_from_slice(b"content-type: text/plain; charset=utf-8\r\ncontent-length: ");
        out.extend_from_slice((msg.len() + 1).to_string().as_bytes());
        if close || self.closes() {
            out.extend_from_slice(b"\r\nconnection: close");
        }
        if let ProxyError::Redirect(to) = self {
            out.extend_from_slice(b"\r\nlocation: ");
            out.extend_from_slice(to.as_bytes());
        }
        if matches!(self, ProxyError::ColdStart) {
            out.extend_from_slice(b"\r\nretry-after: 1");
        }
        out.extend_from_slice(b"\r\n\r\n");
        out.extend_from_slice(msg.as_bytes());
        out.push(b'\n');
    }
}

/// Clears `out` and writes an HTTP/1.1 status line for `status` (fast-path responses).
pub(crate) fn status_line(out: &mut Vec<u8>, status: StatusCode) {
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
}
