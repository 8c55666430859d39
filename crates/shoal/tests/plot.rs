//! `shoal simulate --plot`: the SVG files it writes.

mod common;

use std::process::Command;

use common::*;

fn simulate(args: &[&str]) -> String {
    let out = Command::new(SHOAL)
        .arg("simulate")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn timeline_plots_the_whole_trace_and_a_window() {
    let dir = tempdir();
    let svg = dir.path().join("t.svg");
    let svg_s = svg.to_str().unwrap();
    let base = [
        "--synthetic",
        "5",
        "--days",
        "3",
        "--capacity",
        "0.3",
        "--startup",
        "300",
    ];
    // The default window is the day with the most violation.
    simulate(&[&base[..], &["--plot", svg_s]].concat());
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.contains("whole trace"), "no overview");
    assert!(
        text.contains("the day with the most violation"),
        "no default window"
    );
    assert!(
        text.contains("reactive ready + starting"),
        "no instances panel"
    );
    assert!(
        text.contains("of the time in violation, shaded"),
        "no violation legend"
    );
    // A given window is labelled with its bounds.
    simulate(
        &[
            &base[..],
            &["--plot", svg_s, "--from", "36h", "--to", "42h"],
        ]
        .concat(),
    );
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(
        text.contains("window 36.0–42.0 hours"),
        "window label missing"
    );
    // A window that ends before it starts is refused.
    let out = Command::new(SHOAL)
        .arg("simulate")
        .args(base)
        .args(["--plot", svg_s, "--from", "2d", "--to", "1d"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--to must be after --from"));
}

#[test]
fn sweep_plot_draws_the_curves_and_the_oracle() {
    let dir = tempdir();
    let svg = dir.path().join("s.svg");
    simulate(&[
        "--synthetic",
        "5",
        "--days",
        "2",
        "--capacity",
        "0.3",
        "--startup",
        "300",
        "--sweep",
        "--policy",
        "reactive",
        "--plot",
        svg.to_str().unwrap(),
    ]);
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.contains("oracle (perfect foresight)"), "no oracle");
    assert!(text.contains("instance-hours"), "no axis");
    // One labelled point per target utilization.
    for u in ["0.50", "0.70", "0.90"] {
        assert!(text.lines().any(|l| l.trim() == u), "no point {u}");
    }
}
