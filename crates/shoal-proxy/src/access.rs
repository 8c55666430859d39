//! The access log: one structured line per request (target `shoal::access`), when the
//! listening service has `access_log = true`. It goes through `tracing`, so
//! `--log-format json` makes it JSON.

/// What one request did, for its log line.
pub(crate) struct Entry<'a> {
    /// The service whose instance answered (or that answered itself).
    pub service: &'a str,
    /// The instance, or "-" when shoal answered itself.
    pub instance: &'a str,
    pub client: std::net::IpAddr,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    /// Response body bytes sent to the client.
    pub bytes: u64,
    /// Request start to response headers, and to the end of the body.
    pub headers_ms: f64,
    pub total_ms: f64,
    /// Tries made (1 = no retry).
    pub tries: u32,
    /// The `traceparent` sent upstream.
    pub trace: &'a [u8],
    /// Cache result (hit, miss, ...), "-" when no cache is configured.
    pub cache: &'a str,
}

impl Entry<'_> {
    pub(crate) fn emit(&self) {
        let trace = std::str::from_utf8(self.trace).unwrap_or("-");
        tracing::info!(
            target: "shoal::access",
            service = self.service,
            instance = self.instance,
            client = %self.client,
            method = self.method,
            path = self.path,
            status = self.status,
            bytes = self.bytes,
            headers_ms = self.headers_ms,
            total_ms = self.total_ms,
            tries = self.tries,
            cache = self.cache,
            traceparent = trace,
            "request"
        );
    }
}

/// Milliseconds between two `now_nanos` readings.
pub(crate) fn ms(from: u64, to: u64) -> f64 {
    to.saturating_sub(from) as f64 / 1e6
}
