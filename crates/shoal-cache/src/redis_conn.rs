//! One Redis connection type for a single node or a Redis Cluster, shared by the cache tier and
//! the job store. A comma-separated list of seed URLs (`redis://h1:p1,redis://h2:p2`) means a
//! cluster; one URL means one node.
//!
//! A cluster serves a command only from the node that owns its key's slot, so what a single
//! node accepts in one round trip is split here: a pipeline runs command by command, `SCAN`
//! visits every master. Multi-key `DEL` is split by slot inside the cluster client.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

/// Where to connect: validated once, connected (and reconnected) as often as needed.
#[derive(Clone)]
pub enum RedisClient {
    Node(redis::Client),
    Cluster(ClusterClient),
}

/// Timeouts and retries for one connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnectOptions {
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    /// Reconnect attempts a single-node connection makes on its own.
    pub retries: usize,
    /// Longest wait between those attempts, in milliseconds.
    pub max_delay_ms: u64,
}

impl RedisClient {
    /// Parses one URL, or a comma-separated list of cluster seed URLs.
    pub fn open(url: &str) -> RedisResult<RedisClient> {
        let seeds: Vec<&str> = url
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        match seeds.as_slice() {
            [one] if !url.contains(',') => Ok(RedisClient::Node(redis::Client::open(*one)?)),
            [] => Err((redis::ErrorKind::InvalidClientConfig, "no Redis URL").into()),
            many => {
                // Each seed must parse on its own, so a typo names the URL at fault.
                for s in many {
                    redis::Client::open(*s)?;
                }
                Ok(RedisClient::Cluster(ClusterClient::new(many.to_vec())?))
            }
        }
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisClient::Cluster(_))
    }

    pub async fn connect(&self, o: ConnectOptions) -> RedisResult<RedisConn> {
        match self {
            RedisClient::Node(c) => {
                let cfg = ConnectionManagerConfig::new()
                    .set_connection_timeout(o.connect_timeout)
                    .set_response_timeout(o.response_timeout)
                    .set_number_of_retries(o.retries)
                    .set_max_delay(o.max_delay_ms);
                Ok(RedisConn::Node(
                    ConnectionManager::new_with_config(c.clone(), cfg).await?,
                ))
            }
            RedisClient::Cluster(c) => {
                // The cluster client is rebuilt with these timeouts: it keeps the seeds only.
                let cfg = redis::cluster::ClusterConfig::new()
                    .set_connection_timeout(o.connect_timeout)
                    .set_response_timeout(o.response_timeout);
                Ok(RedisConn::Cluster(
                    c.get_async_connection_with_config(cfg).await?,
                ))
            }
        }
    }
}

/// What a config error says about a URL [`RedisClient::open`] refused.
pub fn url_error(e: &redis::RedisError) -> String {
    format!("expected a redis:// URL, or a comma-separated list of Redis Cluster seed URLs ({e})")
}

/// A live connection; cheap to clone (both kinds multiplex one socket per node).
#[derive(Clone)]
pub enum RedisConn {
    Node(ConnectionManager),
    Cluster(ClusterConnection),
}

impl RedisConn {
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisConn::Cluster(_))
    }

    /// Runs a pipeline whose replies are ignored: in one round trip on a single node, command
    /// by command on a cluster (its keys may live in different slots).
    pub async fn run_pipeline(&mut self, pipe: &Pipeline) -> RedisResult<()> {
        match self {
            RedisConn::Node(c) => pipe.query_async::<()>(c).await,
            RedisConn::Cluster(c) => {
                for cmd in pipe.cmd_iter() {
                    cmd.query_async::<Value>(c).await?;
                }
                Ok(())
            }
        }
    }

    /// Every key matching `pattern`, found with `SCAN` (on each master of a cluster), handed
    /// to `each` in batches; returns the sum of what `each` returned.
    pub async fn scan_each<F>(&mut self, pattern: &str, mut each: F) -> RedisResult<u64>
    where
        F: for<'a> FnMut(&'a mut RedisConn, Vec<String>) -> RedisFuture<'a, u64>,
    {
        let nodes: Vec<Option<(String, u16)>> = match self {
            RedisConn::Node(_) => vec![None],
            RedisConn::Cluster(c) => masters(c).await?.into_iter().map(Some).collect(),
        };
        let mut n = 0;
        for node in nodes {
            let mut cursor: u64 = 0;
            loop {
                let mut cmd = redis::cmd("SCAN");
                cmd.arg(cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(1000);
                let (next, keys): (u64, Vec<String>) = match (&node, &mut *self) {
                    (Some((host, port)), RedisConn::Cluster(c)) => {
                        let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                            host: host.clone(),
                            port: *port,
                        });
                        redis::from_owned_redis_value(c.route_command(&cmd, route).await?)?
                    }
                    _ => cmd.query_async(self).await?,
                };
                if !keys.is_empty() {
                    n += each(self, keys).await?;
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(n)
    }
}

/// The cluster's masters that are not marked failed (`CLUSTER NODES`).
async fn masters(c: &mut ClusterConnection) -> RedisResult<Vec<(String, u16)>> {
    let text: String = redis::cmd("CLUSTER").arg("NODES").query_async(c).await?;
    Ok(parse_masters(&text))
}

/// `<id> <ip:port@cport[,hostname]> <flags> …` per line; keeps masters without `fail`.
fn parse_masters(text: &str) -> Vec<(String, u16)> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let addr = f.nth(1)?;
            let flags = f.next()?;
            let flags: Vec<&str> = flags.split(',').collect();
            if !flags.contains(&"master") || flags.iter().any(|f| f.starts_with("fail")) {
                return None;
            }
            let hostport = addr.split(['@', ',']).next()?;
            let (host, port) = hostport.rsplit_once(':')?;
            let port: u16 = port.parse().ok()?;
            // A master that owns no slots yet has an empty address part in some versions.
            (!host.is_empty() && port != 0).then(|| (host.to_string(), port))
        })
        .collect()
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Node(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Node(c) => c.req_packed_commands(cmd, offset, count),
            RedisConn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Node(c) => c.get_db(),
            RedisConn::Cluster(c) => c.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_url_is_a_node_and_a_list_is_a_cluster() {
        assert!(!RedisClient::open("redis://127.0.0.1:6379")
            .unwrap()
            .is_cluster());
        let c = RedisClient::open("redis://127.0.0.1:7000, redis://127.0.0.1:7001").unwrap();
        assert!(c.is_cluster());
        // A trailing comma still says "cluster": the user wrote a list.
        assert!(RedisClient::open("redis://127.0.0.1:7000,")
            .unwrap()
            .is_cluster());
        assert!(RedisClient::open("").is_err());
        assert!(RedisClient::open("redis://127.0.0.1:7000,not a url").is_err());
    }

    #[test]
    fn masters_are_read_from_cluster_nodes() {
        let text = "\
a1 127.0.0.1:30001@40001 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:30002@40002,host-b master - 0 1 2 connected 5461-10922
c3 127.0.0.1:30003@40003 master,fail - 0 1 3 disconnected
d4 127.0.0.1:30004@40004 slave a1 0 1 1 connected
e5 :0@0 master,noaddr - 0 0 0 disconnected
";
        assert_eq!(
            parse_masters(text),
            vec![
                ("127.0.0.1".to_string(), 30001),
                ("127.0.0.1".to_string(), 30002)
            ]
        );
    }
}
