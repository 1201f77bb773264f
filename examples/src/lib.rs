//! What the examples share: finding a Redis to run against.

/// `REDIS_URL` if set, else a throwaway `redis-server` that lives as long as the returned
/// guard.
///
/// # Errors
///
/// When `REDIS_URL` is unset and no `redis-server` can be started; the message says what
/// to do.
pub async fn redis_for_the_example() -> anyhow::Result<(String, Option<slim_bus_tests::RedisServer>)>
{
    if let Ok(url) = std::env::var("REDIS_URL") {
        println!("using Redis at {url} (REDIS_URL)");
        return Ok((url, None));
    }
    match slim_bus_tests::RedisServer::start().await {
        Ok(server) => {
            println!("started a throwaway redis-server at {}", server.url());
            Ok((server.url(), Some(server)))
        }
        Err(error) => anyhow::bail!(
            "no Redis to run against: REDIS_URL is not set and no redis-server could be started ({error}).\n\
             Either set REDIS_URL=redis://HOST:PORT/, start one with `docker compose up -d redis`, \
             or install redis-server (e.g. `apt-get install redis-server`)."
        ),
    }
}
