//! Two fleets behind one listener, routed by host and by path prefix, each health-checked
//! and scaled on its own.

mod common;

use std::net::SocketAddr;

use common::*;

fn fleet(name: &str, min: u32, max: u32) -> String {
    format!(
        r#"
[services.{name}.fleet]
command = "shoal demo-service"
min = {min}
max = {max}
health_path = "/healthz"
startup_timeout = "20s"

[services.{name}.health]
path = "/healthz"
interval = "500ms"
timeout = "1s"
rise = 1
fall = 2
"#
    )
}

#[test]
fn two_fleets_behind_one_listener() {
    let dir = tempdir();
    let (listen, admin) = (free_port(), free_port());
    let cfg = format!(
        r#"[admin]
listen = "127.0.0.1:{admin}"

[services.web]
listen = "127.0.0.1:{listen}"

[[services.web.routes]]
host = "api.example"
service = "api"

[[services.web.routes]]
prefix = "/shop"
service = "shop"
strip_prefix = true
{api}{shop}"#,
        api = fleet("api", 1, 3),
        shop = fleet("shop", 2, 2),
    );
    let (_shoal, _) = run_shoal(dir.path(), &cfg, listen);
    let svc = |n: &str| api_json(admin, &format!("/api/services/{n}"));
    wait_until(20, "both fleets ready", || {
        ready(&svc("api")) == 1 && ready(&svc("shop")) == 2
    });
    let addr = SocketAddr::from(([127, 0, 0, 1], listen));
    for _ in 0..5 {
        let (s, body) = http(
            addr,
            "GET",
            "/work?cpu_ms=1",
            &[("Host", "api.example")],
            "",
        );
        assert_eq!(s, 200, "{body}");
        let (s, body) = http(addr, "GET", "/shop/work?cpu_ms=1", &[], "");
        assert_eq!(s, 200, "{body}");
    }
    // The shop route strips its prefix: the instance sees /echo, with the prefix forwarded.
    let (s, body) = http(addr, "GET", "/shop/echo", &[], "");
    assert_eq!(s, 200, "{body}");
    assert!(body.contains("\"x-forwarded-prefix\":\"/shop\""), "{body}");
    // Neither route: 404 from shoal, no instance involved.
    let (s, _) = http(addr, "GET", "/work", &[], "");
    assert_eq!(s, 404);
    assert_eq!(svc("api")["requests"], 5);
    assert_eq!(svc("shop")["requests"], 6);
    // Scaling one fleet leaves the other alone.
    let (s, body) = http(
        SocketAddr::from(([127, 0, 0, 1], admin)),
        "POST",
        "/api/services/api/scale",
        &[
            ("Authorization", "Bearer test-token"),
            ("Content-Type", "application/json"),
        ],
        r#"{"desired": 3}"#,
    );
    assert_eq!(s, 200, "{body}");
    wait_until(20, "api scaled to 3", || ready(&svc("api")) == 3);
    assert_eq!(ready(&svc("shop")), 2);
    // Every instance of both pools passes its own pool's health checks.
    for name in ["api", "shop"] {
        let v = svc(name);
        for i in v["instances"].as_array().unwrap() {
            assert_eq!(i["healthy"], true, "{name}: {i}");
        }
    }
}
