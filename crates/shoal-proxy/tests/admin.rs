//! The admin listener's limits: a client that sends nothing, stays idle or crowds the
//! listener holds nothing for long.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use shoal_proxy::admin::{serve_with, AdminLimits};
use shoal_proxy::app::App;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

const LIMITS: AdminLimits = AdminLimits {
    max_connections: 2,
    header_read: Duration::from_millis(300),
    idle: Duration::from_millis(400),
    write_stall: Duration::from_millis(300),
};

async fn admin() -> (SocketAddr, watch::Sender<bool>) {
    let (tx, rx) = watch::channel(false);
    let app = App::new(None, None);
    let addr = serve_with("127.0.0.1:0".parse().unwrap(), app, rx, LIMITS)
        .await
        .unwrap();
    (addr, tx)
}

/// Reads until the peer closes (true) or `secs` pass (false).
async fn closed_within(s: &mut TcpStream, secs: u64) -> bool {
    let mut buf = vec![0u8; 64 << 10];
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_no_head_is_disconnected() {
    let (addr, _stop) = admin().await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metr").await.unwrap();
    assert!(
        closed_within(&mut s, 5).await,
        "a half-sent head held the connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed() {
    let (addr, _stop) = admin().await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /api/services HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    assert!(
        closed_within(&mut s, 5).await,
        "an idle connection stayed open"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_connection_cap_new_clients_wait_for_a_slot() {
    let (addr, _stop) = admin().await;
    let mut held = Vec::new();
    for _ in 0..LIMITS.max_connections {
        held.push(TcpStream::connect(addr).await.unwrap());
    }
    // Let the listener take both before the third arrives.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /api/services HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("served once a slot freed")
        .unwrap();
    assert!(out.starts_with(b"HTTP/1.1 200"));
    // It was served only after a silent connection timed out.
    assert!(
        started.elapsed() >= LIMITS.header_read - Duration::from_millis(60),
        "served at once past the cap ({:?})",
        started.elapsed()
    );
}
