//! Helpers shared by the integration tests: a demo server on port 0 and a tiny client.
#![allow(dead_code)]

use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use shoal_tools::DemoConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A running demo server; send on `stop` (or drop it) to shut it down.
pub struct Demo {
    pub addr: SocketAddr,
    pub stop: oneshot::Sender<()>,
    pub task: JoinHandle<std::io::Result<()>>,
}

pub async fn start_demo(instance: &str) -> Demo {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cfg = DemoConfig {
        instance: instance.to_owned(),
        ..DemoConfig::default()
    };
    let (stop, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(shoal_tools::run_demo_until(listener, cfg, async move {
        let _ = rx.await;
    }));
    Demo { addr, stop, task }
}

/// Sends one request on a fresh connection; returns status, headers and the whole body.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (StatusCode, HeaderMap, Bytes) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::from(body.to_owned()))).unwrap();
    let resp = tx.send_request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (parts.status, parts.headers, body)
}

pub async fn get(addr: SocketAddr, path: &str) -> (StatusCode, Bytes) {
    let (s, _, b) = request(addr, "GET", path, &[], "").await;
    (s, b)
}
