//! One Redis connection made on first use, and bounded calls that drop it on failure so
//! the next call reconnects (the replicas' shared config and ticket keys use it).

use std::time::Duration;

use shoal_cache::redis_conn::{ConnectOptions, RedisClient, RedisConn};

pub struct LazyRedis {
    client: RedisClient,
    conn: tokio::sync::Mutex<Option<RedisConn>>,
}

impl LazyRedis {
    pub fn open(url: &str) -> Result<LazyRedis, String> {
        Ok(LazyRedis {
            client: RedisClient::open(url).map_err(|e| e.to_string())?,
            conn: tokio::sync::Mutex::new(None),
        })
    }

    async fn conn(&self) -> redis::RedisResult<RedisConn> {
        let mut c = self.conn.lock().await;
        if let Some(c) = &*c {
            return Ok(c.clone());
        }
        let conn = self
            .client
            .connect(ConnectOptions {
                connect_timeout: Duration::from_secs(1),
                response_timeout: Duration::from_secs(1),
                retries: 1,
                max_delay_ms: 100,
            })
            .await?;
        *c = Some(conn.clone());
        Ok(conn)
    }

    /// `cmd`, answered within 2 s or an error.
    pub async fn call<T: redis::FromRedisValue>(&self, cmd: redis::Cmd) -> Result<T, String> {
        let r = tokio::time::timeout(Duration::from_secs(2), async {
            let mut c = self.conn().await?;
            cmd.query_async::<T>(&mut c).await
        })
        .await;
        let e = match r {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "Redis did not answer in time".to_string(),
        };
        *self.conn.lock().await = None;
        Err(e)
    }
}
