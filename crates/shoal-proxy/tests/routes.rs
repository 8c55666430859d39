//! Routes behind one listener, and reloads that change them.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use shoal_proxy::{App, Config};

fn config(text: &str) -> Config {
    Config::parse(Path::new("routes.toml"), text).unwrap()
}

fn routed(web: &Backend, api: &Backend, shop: &Backend) -> String {
    format!(
        r#"
[admin]
listen = "127.0.0.1:0"

[services.web]
listen = "127.0.0.1:0"
backends = ["{web}"]

[[services.web.routes]]
host = "shop.example"
service = "shop"

[[services.web.routes]]
prefix = "/api"
service = "api"
strip_prefix = true

[[services.web.routes]]
prefix = "/"

[services.api]
backends = ["{api}"]

[services.shop]
backends = ["{shop}"]
"#,
        web = web.addr,
        api = api.addr,
        shop = shop.addr
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_listener_routes_by_host_and_prefix() {
    let (web, api, shop) = (
        Backend::start("web").await,
        Backend::start("api").await,
        Backend::start("shop").await,
    );
    let app = App::new(None, None);
    app.start(&config(&routed(&web, &api, &shop)))
        .await
        .unwrap();
    let addr = app.listen_addr("web").unwrap();
    assert!(
        app.listen_addr("api").is_none(),
        "api has no listener of its own"
    );
    let cl = client();
    assert_eq!(get(&cl, addr, "/").await, (200, "web".into()));
    assert_eq!(get(&cl, addr, "/apix").await, (200, "web".into()));
    assert_eq!(get(&cl, addr, "/api/users").await, (200, "api".into()));
    assert!(api.last.lock().unwrap().starts_with("GET /users\n"));
    let (s, h) = get(&cl, addr, "/api/headers").await;
    assert_eq!(s, 200);
    assert!(h.contains("\"x-forwarded-prefix\": \"/api\""), "{h}");
    assert_eq!(
        get_with(&cl, addr, "/api/users", &[("host", "shop.example")]).await,
        (200, "shop".into())
    );
    // The general path routes the same way (HTTP/1.0 is handed over).
    let resp = raw(addr, b"GET /api/v HTTP/1.0\r\nHost: x\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.0 200"), "{resp}");
    assert!(resp.ends_with("api"), "{resp}");
    assert!(api.last.lock().unwrap().starts_with("GET /v\n"));
    // Each service counts its own requests.
    assert_eq!(app.service("api").unwrap().metrics.requests.get(), 3);
    assert_eq!(app.service("shop").unwrap().metrics.requests.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_is_404_on_both_paths() {
    let a = Backend::start("a").await;
    let text = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[services.web]\nlisten = \"127.0.0.1:0\"\nbackends = [\"{}\"]\n[[services.web.routes]]\nhost = \"a.example\"\n",
        a.addr
    );
    let app = App::new(None, None);
    app.start(&config(&text)).await.unwrap();
    let addr = app.listen_addr("web").unwrap();
    let cl = client();
    assert_eq!(
        get_with(&cl, addr, "/", &[("host", "a.example")]).await.0,
        200
    );
    assert_eq!(
        get_with(&cl, addr, "/", &[("host", "b.example")]).await.0,
        404
    );
    let resp = raw(addr, b"GET / HTTP/1.0\r\nHost: b.example\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.0 404"), "{resp}");
    assert_eq!(a.count(), 1);
}

#[test]
fn route_errors_name_line_and_field() {
    let e = Config::parse(
        Path::new("r.toml"),
        "[services.web]\nlisten = \"127.0.0.1:8080\"\n\n[[services.web.routes]]\nprefix = \"/a\"\nservice = \"nope\"\n",
    )
    .unwrap_err();
    assert_eq!(
        (e.line, e.field.as_str()),
        (6, "services.web.routes[0].service"),
        "{e}"
    );
    let e = Config::parse(
        Path::new("r.toml"),
        "[services.web]\nlisten = \"127.0.0.1:8080\"\n[[services.web.routes]]\nprefix = \"/\"\n[[services.web.routes]]\nprefix = \"api\"\n",
    )
    .unwrap_err();
    assert_eq!(
        (e.line, e.field.as_str()),
        (6, "services.web.routes[1].prefix"),
        "{e}"
    );
    let e = Config::parse(
        Path::new("r.toml"),
        "[services.web]\nlisten = \"127.0.0.1:8080\"\n[[services.web.routes]]\nhost = \"a b\"\n",
    )
    .unwrap_err();
    assert_eq!(e.field, "services.web.routes[0].host", "{e}");
    let e = Config::parse(
        Path::new("r.toml"),
        "[services.web]\nlisten = \"127.0.0.1:8080\"\n[[services.web.routes]]\nprefx = \"/\"\n",
    )
    .unwrap_err();
    assert_eq!(
        (e.line, e.field.as_str()),
        (4, "services.web.routes[0].prefx"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_converge_and_never_leave_a_service_empty() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let both = |wb: u32| {
        format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n[services.web]\nlisten = \"127.0.0.1:0\"\nbackends = [\"{}\", {{ addr = \"{}\", weight = {wb} }}]\n",
            a.addr, b.addr
        )
    };
    let only_a = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[services.web]\nlisten = \"127.0.0.1:0\"\nbackends = [\"{}\"]\n",
        a.addr
    );
    let app = App::new(None, None);
    app.start(&config(&both(1))).await.unwrap();
    let addr = app.listen_addr("web").unwrap();
    let svc = app.service("web").unwrap();
    // b removed and re-added by two quick reloads, while a request holds b busy: b ends up
    // present, whatever order the background drain finishes in.
    b.delay_ms.store(300, Ordering::SeqCst);
    let cl = client();
    let busy = {
        let cl = cl.clone();
        tokio::spawn(async move {
            for _ in 0..2 {
                get(&cl, addr, "/").await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    app.apply(&config(&only_a)).await.unwrap();
    app.apply(&config(&both(1))).await.unwrap();
    busy.await.unwrap();
    eventually(5, || {
        let m = svc.pool.members();
        m.len() == 2
            && m.iter()
                .all(|i| i.state() == shoal_proxy::pool::State::Ready)
    })
    .await;
    b.delay_ms.store(0, Ordering::SeqCst);

    // A one-backend service changing weight under load never answers 503.
    app.apply(&config(&only_a)).await.unwrap();
    eventually(5, || svc.pool.members().len() == 1).await;
    let one_weight = |w: u32| {
        format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n[services.web]\nlisten = \"127.0.0.1:0\"\nbackends = [{{ addr = \"{}\", weight = {w} }}]\n",
            a.addr
        )
    };
    let stop = Arc::new(AtomicBool::new(false));
    let bad = Arc::new(AtomicUsize::new(0));
    let load = {
        let (stop, bad, cl) = (stop.clone(), bad.clone(), cl.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                let (s, body) = get(&cl, addr, "/").await;
                if s != 200 {
                    eprintln!("during weight changes: {s} {body}");
                    bad.fetch_add(1, Ordering::SeqCst);
                }
                n += 1;
            }
            n
        })
    };
    for w in 2..12 {
        app.apply(&config(&one_weight(w))).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let n = load.await.unwrap();
    assert!(n > 20, "load ran: {n}");
    assert_eq!(
        bad.load(Ordering::SeqCst),
        0,
        "non-200 answers during weight changes"
    );

    // A reload whose listener cannot bind changes nothing.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let clash = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[services.web]\nlisten = \"127.0.0.1:0\"\nbackends = [\"{}\"]\n[services.other]\nlisten = \"{}\"\nbackends = [\"{}\"]\n",
        b.addr,
        taken.local_addr().unwrap(),
        b.addr
    );
    assert!(app.apply(&config(&clash)).await.is_err());
    assert!(app.service("other").is_none());
    let m = svc.pool.members();
    assert!(m.iter().all(|i| i.addr == a.addr), "web unchanged");
    assert_eq!(get(&cl, addr, "/").await, (200, "a".into()));
}
