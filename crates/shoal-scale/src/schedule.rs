//! Scheduled capacity: cron-like minimum overrides, in UTC.
//!
//! A rule reads like the config line it comes from:
//! `{ days = "mon-fri", from = "08:00", to = "18:00", min = 4 }`, or as one string
//! `"mon-fri 08:00-18:00 min=4"`. `days` is a comma list of days or ranges
//! (`mon-fri`, `sat,sun`, `mon,wed-fri`, `fri-mon` wraps) or `*`/`daily`; `to` may be
//! `24:00`; a `from` after `to` spans midnight (the night belongs to the start day).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::Error;

const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// One minimum-capacity override.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawRule", into = "RawRule")]
pub struct ScheduleRule {
    /// Bit i set = weekday i (0 = Monday) starts a window.
    days: u8,
    /// Window start, minutes after midnight UTC.
    from_min: u32,
    /// Window end, minutes after midnight (≤ 1440); less than `from_min` wraps.
    to_min: u32,
    /// The minimum instance count inside the window.
    pub min: u32,
}

/// The serde shape of a rule, as written in the config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    /// Days, e.g. `"mon-fri"`.
    pub days: String,
    /// Start time `HH:MM` (UTC).
    pub from: String,
    /// End time `HH:MM` (UTC), exclusive; `24:00` allowed.
    pub to: String,
    /// Minimum instances inside the window.
    pub min: u32,
}

impl TryFrom<RawRule> for ScheduleRule {
    type Error = Error;
    fn try_from(raw: RawRule) -> Result<Self, Error> {
        ScheduleRule::new(&raw.days, &raw.from, &raw.to, raw.min)
    }
}

impl From<ScheduleRule> for RawRule {
    fn from(rule: ScheduleRule) -> Self {
        RawRule {
            days: rule.days_spec(),
            from: fmt_hhmm(rule.from_min),
            to: fmt_hhmm(rule.to_min),
            min: rule.min,
        }
    }
}

fn fmt_hhmm(m: u32) -> String {
    format!("{:02}:{:02}", m / 60, m % 60)
}

fn parse_day(s: &str) -> Result<u8, Error> {
    const FULL: [&str; 7] = [
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
    ];
    let lower = s.trim().to_ascii_lowercase();
    (0..7)
        .find(|&i| lower == DAY_NAMES[i] || lower == FULL[i])
        .map(|i| i as u8)
        .ok_or_else(|| Error::Schedule(format!("unknown day `{s}` (use mon, tue, … sun)")))
}

fn parse_days(spec: &str) -> Result<u8, Error> {
    let spec = spec.trim();
    if spec == "*" || spec.eq_ignore_ascii_case("daily") || spec.eq_ignore_ascii_case("all") {
        return Ok(0x7f);
    }
    let mut bits = 0u8;
    for part in spec.split(',') {
        if part.trim().is_empty() {
            return Err(Error::Schedule(format!("empty day in `{spec}`")));
        }
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (parse_day(a)?, parse_day(b)?);
                let mut d = a;
                loop {
                    bits |= 1 << d;
                    if d == b {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
            None => bits |= 1 << parse_day(part)?,
        }
    }
    Ok(bits)
}

fn parse_hhmm(s: &str) -> Result<u32, Error> {
    let bad = || Error::Schedule(format!("bad time `{s}` (use HH:MM, 00:00 to 24:00)"));
    let (h, m) = s.trim().split_once(':').ok_or_else(bad)?;
    let h: u32 = h.parse().map_err(|_| bad())?;
    let m: u32 = m.parse().map_err(|_| bad())?;
    if m >= 60 || h > 24 || (h == 24 && m != 0) {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

impl ScheduleRule {
    /// Build a rule from its readable parts.
    pub fn new(days: &str, from: &str, to: &str, min: u32) -> Result<Self, Error> {
        let rule = Self {
            days: parse_days(days)?,
            from_min: parse_hhmm(from)?,
            to_min: parse_hhmm(to)?,
            min,
        };
        if rule.from_min == rule.to_min {
            return Err(Error::Schedule(format!(
                "empty window: from {from} equals to {to}"
            )));
        }
        Ok(rule)
    }

    /// The canonical `days` spec (comma list of days).
    pub fn days_spec(&self) -> String {
        if self.days == 0x7f {
            return "*".to_string();
        }
        (0..7)
            .filter(|d| self.days & (1 << d) != 0)
            .map(|d| DAY_NAMES[d])
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Whether the rule is in force at `wall_epoch_secs` (UTC).
    pub fn active(&self, wall_epoch_secs: f64) -> bool {
        let secs = wall_epoch_secs.floor() as i64;
        let day = secs.div_euclid(86_400);
        // 1970-01-01 was a Thursday (weekday 3 with Monday = 0).
        let weekday = (day + 3).rem_euclid(7) as u8;
        let minute = (secs.rem_euclid(86_400) / 60) as u32;
        let starts = |wd: u8| self.days & (1 << wd) != 0;
        if self.from_min < self.to_min {
            starts(weekday) && minute >= self.from_min && minute < self.to_min
        } else {
            // Spans midnight: evening part today, or morning part of a window that
            // started yesterday.
            (starts(weekday) && minute >= self.from_min)
                || (starts((weekday + 6) % 7) && minute < self.to_min)
        }
    }
}

impl FromStr for ScheduleRule {
    type Err = Error;
    /// Parse `"mon-fri 08:00-18:00 min=4"`.
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || {
            Error::Schedule(format!(
                "bad rule `{s}` (expected e.g. `mon-fri 08:00-18:00 min=4`)"
            ))
        };
        let parts: Vec<&str> = s.split_whitespace().collect();
        let [days, window, min] = parts.as_slice() else {
            return Err(bad());
        };
        let (from, to) = window.split_once('-').ok_or_else(bad)?;
        let min = min
            .strip_prefix("min=")
            .and_then(|m| m.parse().ok())
            .ok_or_else(bad)?;
        ScheduleRule::new(days, from, to, min)
    }
}

impl fmt::Display for ScheduleRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}-{} min={}",
            self.days_spec(),
            fmt_hhmm(self.from_min),
            fmt_hhmm(self.to_min),
            self.min
        )
    }
}

/// The largest scheduled minimum in force at `wall_epoch_secs`, if any rule is.
pub fn scheduled_min(rules: &[ScheduleRule], wall_epoch_secs: f64) -> Option<u32> {
    rules
        .iter()
        .filter(|r| r.active(wall_epoch_secs))
        .map(|r| r.min)
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2024-01-01 was a Monday.
    const MONDAY: f64 = 1_704_067_200.0;
    const H: f64 = 3600.0;

    #[test]
    fn weekdays_office_hours() {
        let r: ScheduleRule = "mon-fri 08:00-18:00 min=4".parse().unwrap();
        assert!(!r.active(MONDAY + 7.99 * H));
        assert!(r.active(MONDAY + 8.0 * H));
        assert!(r.active(MONDAY + 17.99 * H));
        assert!(!r.active(MONDAY + 18.0 * H));
        assert!(r.active(MONDAY + 4.0 * 24.0 * H + 9.0 * H)); // Friday
        assert!(!r.active(MONDAY + 5.0 * 24.0 * H + 9.0 * H)); // Saturday
        assert_eq!(
            scheduled_min(std::slice::from_ref(&r), MONDAY + 9.0 * H),
            Some(4)
        );
        assert_eq!(scheduled_min(&[r], MONDAY), None);
    }

    #[test]
    fn overnight_and_wrapping_days() {
        let r = ScheduleRule::new("fri-mon", "22:00", "02:00", 3).unwrap();
        assert_eq!(r.days_spec(), "mon,fri,sat,sun");
        assert!(r.active(MONDAY + 23.0 * H)); // Monday night
        assert!(r.active(MONDAY + 25.0 * H)); // Tuesday 01:00, started Monday
        assert!(!r.active(MONDAY + 2.0 * 24.0 * H + 1.0 * H)); // Wednesday 01:00
        assert!(r.active(MONDAY + 1.0 * H)); // Monday 01:00, started Sunday
    }

    #[test]
    fn serde_form_round_trips_and_errors_are_named() {
        let r: ScheduleRule =
            serde_json::from_str(r#"{"days":"sat,sun","from":"00:00","to":"24:00","min":2}"#)
                .unwrap();
        assert!(r.active(MONDAY - 1.0)); // Sunday 23:59:59
        let back = serde_json::to_string(&r).unwrap();
        assert!(back.contains("\"sat,sun\""), "{back}");
        assert_eq!(r.to_string(), "sat,sun 00:00-24:00 min=2");
        let err = ScheduleRule::new("mon-fry", "08:00", "18:00", 1).unwrap_err();
        assert!(err.to_string().contains("fry"), "{err}");
        assert!(ScheduleRule::new("mon", "8:75", "18:00", 1).is_err());
        assert!(ScheduleRule::new("mon", "08:00", "08:00", 1).is_err());
        assert!("mon 08:00 min=1".parse::<ScheduleRule>().is_err());
    }
}
