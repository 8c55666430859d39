// Scratch: explore predictive settings (removed before hand-off).
use shoal_scale::sim::{simulate, FleetModel};
use shoal_scale::trace::{parse_csv, synthetic};
use shoal_scale::*;
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let trace = if args[1].starts_with("syn") {
        synthetic(args[1][3..].parse().unwrap(), 28)
    } else {
        parse_csv(&std::fs::read_to_string(&args[1]).unwrap(), "t").unwrap()
    };
    let cap = 0.1;
    let model = FleetModel::new(cap, 120.0);
    let params = PolicyParams {
        capacity_rps: cap,
        startup_secs: 120.0,
        ..Default::default()
    };
    let mut p = policy_by_name("reactive", &params).unwrap();
    let r = simulate(&trace, p.as_mut(), &model, |_| {});
    println!(
        "reactive viol {:.3}% hours {:.0}",
        100.0 * r.violation_fraction,
        r.instance_hours
    );
    for spec in &args[2..] {
        // q,u,stab
        let v: Vec<f64> = spec.split(',').map(|x| x.parse().unwrap()).collect();
        let mut c = PredictiveConfig::for_params(&params, PredictiveMode::ForecastAndScale);
        c.quantile = v[0];
        c.safety_target_scale = v[1] / 0.7;
        c.safety_stabilization_secs = v[2];
        if v.len() > 3 {
            c.max_error_ratio = v[3];
        }
        if v.len() > 4 {
            c.scale_down_delay_secs = v[4];
        }
        c.target_utilization = if v.len() > 5 && v[5] > 0.0 {
            Some(v[5])
        } else {
            None
        };
        c.budget = if v.len() > 6 && v[6] > 0.0 {
            Some(v[6])
        } else {
            None
        };
        let mut p = PredictivePolicy::new("predictive", c).unwrap();
        let mut m2 = model.clone();
        m2.series_points = (trace.duration_secs() / 15.0) as usize;
        let r = simulate(&trace, &mut p, &m2, |_| {});

        eprintln!(
            "final q {:.4} ratio {:?} budget {:?}",
            p.quantile(),
            p.spend_ratio(),
            p.config().budget
        );
        let mut m3 = model.clone();
        m3.series_points = m2.series_points;
        let mut rp = policy_by_name("reactive", &params).unwrap();
        let rr = simulate(&trace, rp.as_mut(), &m3, |_| {});
        let days = (trace.duration_secs() / 86400.0).ceil() as usize;
        let mut vd = vec![(0.0, 0.0, 0.0, 0.0); days];
        for (a, b) in r.series.iter().zip(&rr.series) {
            let d = (a.t / 86400.0) as usize;
            if a.demand_rps > a.ready_capacity_rps {
                vd[d].0 += 15.0;
            }
            if b.demand_rps > b.ready_capacity_rps {
                vd[d].1 += 15.0;
            }
            vd[d].2 += a.instances as f64 * 15.0 / 3600.0;
            vd[d].3 += b.instances as f64 * 15.0 / 3600.0;
        }
        if std::env::var("DAYS").is_ok() {
            for (d, v) in vd.iter().enumerate() {
                println!(
                    "day {d:2} pred viol {:6.0} hours {:5.0} | reactive viol {:6.0} hours {:5.0}",
                    v.0, v.2, v.1, v.3
                );
            }
        }
        println!(
            "{spec:>20} viol {:.3}% ({:.2}x) hours {:.0} ({:.3}x) reasons {:?}",
            100.0 * r.violation_fraction,
            r.violation_fraction / 1.0,
            r.instance_hours,
            r.instance_hours / 1.0,
            r.reasons
        );
    }
}
