// Included (`include!`) by every test harness that hands a port to a child process.

/// A loopback port nothing listens on, below the kernel's ephemeral range: a port picked
/// by binding `:0` lies inside that range, where any outgoing connection may take it as
/// its source port before the child binds it (or while a broker restarts on it).
pub fn free_port() -> u16 {
    use std::collections::HashSet;
    use std::sync::Mutex;
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (from, to) = if low > 12000 { (10000, low) } else { (61000, 65535) };
    let span = u32::from(to - from);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
        ^ std::process::id().wrapping_mul(2654435761);
    let mut given = GIVEN.lock().unwrap();
    let given = given.get_or_insert_with(HashSet::new);
    for i in 0..span {
        let port = from + ((seed.wrapping_add(i.wrapping_mul(7919))) % span) as u16;
        if given.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return port;
        }
    }
    panic!("no free loopback port in {from}..{to}");
}
