//! What an idle keep-alive connection costs: its task and socket registration, not its
//! buffers. The heap is counted by this test binary's own allocator.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::*;
use stats_alloc::{StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static GLOBAL: &StatsAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

/// Live heap bytes of the whole test process.
fn live() -> isize {
    let s = GLOBAL.stats();
    // A realloc is already in these two (its `bytes_reallocated` is the same change again).
    s.bytes_allocated as isize - s.bytes_deallocated as isize
}

/// `n` client connections (blocking sockets: they cost this process no heap), each after
/// one answered request.
fn open_idle(addr: std::net::SocketAddr, n: usize) -> Vec<std::net::TcpStream> {
    (0..n)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
            let mut got = Vec::new();
            let mut b = [0u8; 1024];
            while !got.ends_with(b"b1") {
                let k = s.read(&mut b).unwrap();
                assert!(k > 0, "closed before the answer");
                got.extend_from_slice(&b[..k]);
            }
            s
        })
        .collect()
}

/// Live heap once it has stopped moving (tasks park after their answer is written).
async fn settled() -> isize {
    let mut last = live();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = live();
        if (now - last).abs() < 4096 {
            return now;
        }
        last = now;
    }
    panic!("the heap never settled");
}

// One runtime thread serves the proxy (the clients block on the blocking pool), so spare
// buffers stay on that thread rather than piling up on another.
#[tokio::test]
async fn an_idle_keep_alive_connection_holds_no_buffers() {
    let b1 = Backend::start("b1").await;
    let p = start_proxy(service_config(&[&b1], "round-robin")).await;
    let addr = p.addr;
    // Warm-up: the upstream pool, the allocator's caches; then closed.
    let warm = tokio::task::spawn_blocking(move || open_idle(addr, 100))
        .await
        .unwrap();
    drop(warm);
    let before = settled().await;
    // Two descriptors each in this process: within a default limit of 1,024.
    const N: usize = 400;
    let conns = tokio::task::spawn_blocking(move || open_idle(addr, N))
        .await
        .unwrap();
    let after = settled().await;
    let per_conn = (after - before) / N as isize;
    println!("heap per idle keep-alive connection: {per_conn} bytes");
    // One read buffer is 8 KiB: a connection keeping either of its buffers would be over.
    assert!(
        per_conn < 8 * 1024,
        "an idle connection holds {per_conn} bytes of heap"
    );
    drop(conns);
}
