//! `shoal simulate` end to end: trace errors name their line; predictive beats reactive on
//! seeded synthetic traces it was not tuned on.

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;

fn simulate(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(SHOAL)
        .arg("simulate")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn malformed_traces_name_the_line() {
    let dir = tempdir();
    for (name, text, want) in [
        ("header.csv", "time,rate\n0,1\n", ":1:"),
        ("negative.csv", "t,rps\n0,1\n60,-2\n", ":3:"),
        ("order.csv", "t,rps\n0,1\n60,2\n60,3\n", ":4:"),
        ("number.csv", "t,rps\n0,1\n60,lots\n", ":3:"),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let (code, _, err) = simulate(&[
            "--trace",
            path.to_str().unwrap(),
            "--capacity",
            "1",
            "--startup",
            "60",
        ]);
        assert_eq!(code, Some(1), "{name}: {err}");
        assert!(
            err.contains(&format!("{}{want}", path.display())),
            "{name}: {err}"
        );
    }
}

#[test]
fn predictive_beats_reactive_on_synthetic_traces() {
    for seed in ["1", "2"] {
        let (code, out, err) = simulate(&[
            "--synthetic",
            seed,
            "--days",
            "14",
            "--capacity",
            "0.1",
            "--startup",
            "120",
            "--policy",
            "reactive",
            "--policy",
            "predictive",
            "--json",
        ]);
        assert_eq!(code, Some(0), "{err}");
        let v: Value = serde_json::from_str(&out).unwrap();
        let (r, p) = (&v[0], &v[1]);
        assert_eq!(
            (r["policy"].as_str(), p["policy"].as_str()),
            (Some("reactive"), Some("predictive"))
        );
        let (rv, pv) = (
            r["violation_seconds"].as_f64().unwrap(),
            p["violation_seconds"].as_f64().unwrap(),
        );
        let (rh, ph) = (
            r["instance_hours"].as_f64().unwrap(),
            p["instance_hours"].as_f64().unwrap(),
        );
        assert!(
            rv > 0.0,
            "seed {seed}: the trace must stress reactive at all"
        );
        assert!(
            pv <= 0.5 * rv,
            "seed {seed}: predictive {pv} s vs reactive {rv} s"
        );
        assert!(
            ph <= rh,
            "seed {seed}: predictive {ph} h vs reactive {rh} h"
        );
    }
}
