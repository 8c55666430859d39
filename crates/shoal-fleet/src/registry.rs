//! Fleet providers, registered by name. Each says how its own `[services.NAME.fleet]` fields
//! are checked, what it needs from the rest of shoal, and how it starts; config validation
//! and `Fleets` look a provider up here instead of matching names. A new provider is a
//! module that defines a [`ProviderKind`] plus one line in [`PROVIDERS`].

use std::sync::Arc;

use shoal_proxy::proxy::Service;

use crate::cluster::Leadership;
use crate::config::{FleetConfig, FleetSpec};
use crate::provider::{Membership, Provider};
use crate::supervise::Registry;

/// What a provider gets to start one fleet.
pub struct Start<'a> {
    pub spec: &'a FleetSpec,
    /// The service the fleet's instances serve (its pool routes to them).
    pub service: &'a Arc<Service>,
    /// Where membership changes go (the pool, and a worker set for async routes).
    pub members: Arc<dyn Membership>,
    /// With replicas: the fleet's election (only the leader writes).
    pub leadership: Option<Arc<Leadership>>,
    /// The local-process supervisor, for providers with `local_processes`.
    pub processes: Option<Arc<Registry>>,
}

/// A config error in one of the provider's fields: the field (under `fleet`) and why.
pub type FieldError = (&'static str, String);

/// One provider's entry.
pub struct ProviderKind {
    pub name: &'static str,
    /// Starts and stops instances (false: the service's own `backends`, reported only).
    pub scales: bool,
    /// Runs processes on this host: needs the supervisor in `data_dir`.
    pub local_processes: bool,
    /// Knows its instances' size without `cpu`/`memory` (vertical `auto` can start from it).
    pub sized_by_platform: bool,
    /// Can elect a leader through a Kubernetes Lease (`[cluster]` without Redis).
    pub lease_election: bool,
    /// Checks the provider's own fields; an error names the field (under `fleet`).
    pub check: fn(&FleetConfig, has_autoscale: bool) -> Result<(), FieldError>,
    /// Starts the fleet (its background tasks included).
    pub start: fn(Start<'_>) -> Result<Arc<dyn Provider>, String>,
}

/// Every provider shoal knows.
pub static PROVIDERS: &[&ProviderKind] = &[
    &crate::process::KIND,
    &crate::provider::STATIC_KIND,
    &crate::kube::KIND,
];

/// The provider called `name`.
pub fn find(name: &str) -> Option<&'static ProviderKind> {
    PROVIDERS.iter().copied().find(|k| k.name == name)
}

/// Whether the provider called `name` starts and stops instances.
pub fn scales(name: &str) -> bool {
    find(name).is_some_and(|k| k.scales)
}

/// The names, for error messages: `"process", "static" or "kubernetes"`.
pub fn names() -> String {
    let quoted: Vec<String> = PROVIDERS.iter().map(|k| format!("{:?}", k.name)).collect();
    match quoted.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn providers_are_found_by_name_and_named_in_errors() {
        assert_eq!(find("process").map(|k| k.scales), Some(true));
        assert_eq!(find("static").map(|k| k.scales), Some(false));
        assert!(find("kubernetes").is_some_and(|k| k.lease_election && k.sized_by_platform));
        assert!(find("nomad").is_none());
        assert_eq!(names(), r#""process", "static" or "kubernetes""#);
    }
}
