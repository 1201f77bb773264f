//! What the examples share: finding a Redis to run against, or running without one.

/// Where an example runs: `REDIS_URL` if set, else a throwaway `redis-server` that lives as
/// long as the returned guard, else the in-memory backend (`memory://`), so that the
/// examples run on a machine without Redis. Says which in one line.
///
/// # Errors
///
/// Never at present: the in-memory backend is the last resort.
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
        Err(_) => {
            println!(
                "no Redis found (REDIS_URL is unset and no redis-server could be started): running on \
                 the in-memory backend; set REDIS_URL, `docker compose up -d redis` or install \
                 redis-server to use Redis"
            );
            Ok(("memory://".to_owned(), None))
        }
    }
}
