//! A client process: one tenant's user of the portal, reading and writing
//! through the load balancer at a fixed rate for the whole soak, checking every
//! answer, and logging every request with its outcome (and, for a write, the id
//! of the row it was told was saved). It stops when its standard input closes,
//! so it never outlives the soak.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::sync::Mutex;

/// One request, as logged.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// The `X-Request-Id` sent, which the load balancer's log names too.
    pub id: String,
    pub tenant: String,
    pub method: String,
    pub path: String,
    /// Unix milliseconds when the request was sent and when its outcome was known.
    pub sent_ms: u64,
    pub done_ms: u64,
    /// The answer's status, or none when the request failed below HTTP.
    pub status: Option<u16>,
    /// Why the request failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A write the answer acknowledged: the row as sent and the id it was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack: Option<Ack>,
    /// An answer holding another tenant's data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leak: Option<String>,
}

impl Record {
    /// Whether the client got what it asked for.
    pub fn ok(&self) -> bool {
        self.error.is_none() && self.status.is_some_and(|s| s < 400)
    }
}

/// A home the client saved, as sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ack {
    pub row: i64,
    pub address: String,
    pub city: String,
    pub price: i64,
    pub bedrooms: i32,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The address prefix of every home a soak client of `tenant` saves: what
/// tells whose a home is when it shows up in an answer.
pub fn marker(tenant: &str) -> String {
    format!("soak {tenant} #")
}

/// Another tenant's home in an answer to `tenant`: a soak home not marked as
/// its own; for a tenant other than tenant zero also any home that is not its own
/// (tenant zero's sample homes carry no marker).
pub fn foreign(tenant: &str, zero: bool, address: &str) -> bool {
    if address.starts_with(&marker(tenant)) {
        return false;
    }
    !zero || address.starts_with("soak ")
}

/// The client's command line, as `run` starts it.
#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    pub target: String,
    #[arg(long)]
    pub tenant: String,
    #[arg(long)]
    pub zero: bool,
    #[arg(long)]
    pub rate: u32,
    #[arg(long)]
    pub homes: u32,
    #[arg(long)]
    pub log: std::path::PathBuf,
}

pub async fn run(args: Args) -> Result<()> {
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(64)
        .build()?;
    let log = std::fs::File::create(&args.log)
        .with_context(|| format!("creating {}", args.log.display()))?;
    let log = Arc::new(std::sync::Mutex::new(std::io::BufWriter::new(log)));
    let saved: Arc<Mutex<Vec<i64>>> = Arc::default();
    let args = Arc::new(args);
    let mut stdin = tokio::io::stdin();
    let mut ticks = tokio::time::interval(Duration::from_secs(1) / args.rate.max(1));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tasks = tokio::task::JoinSet::new();
    let mut buf = [0u8; 64];
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = ticks.tick() => {
                n += 1;
                tasks.spawn(one(Arc::clone(&args), http.clone(), n, Arc::clone(&saved), Arc::clone(&log)));
                while tasks.try_join_next().is_some() {}
            }
            read = stdin.read(&mut buf) => {
                if matches!(read, Ok(0) | Err(_)) {
                    break;
                }
            }
        }
    }
    // Requests in flight are waited for: each ends with an answer or a timeout.
    while tasks.join_next().await.is_some() {}
    let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
    log.flush()?;
    Ok(())
}

/// The `n`th request: a mix of reads of the tenant's homes (each answer
/// checked for another tenant's data) and saves of new ones.
async fn one(
    args: Arc<Args>,
    http: reqwest::Client,
    n: u64,
    saved: Arc<Mutex<Vec<i64>>>,
    log: Arc<std::sync::Mutex<std::io::BufWriter<std::fs::File>>>,
) {
    let id = format!("soak-{}-{n}", args.tenant);
    let base = format!("http://{}", args.target);
    let host = format!("{}.portal.test", args.tenant);
    let mine = {
        let s = saved.lock().await;
        (!s.is_empty()).then(|| s[(n as usize / 5) % s.len()])
    };
    let (method, path, body) = match n % 5 {
        0 | 1 if args.zero => (
            "GET",
            format!("/homes/{}", 1 + n % u64::from(args.homes)),
            None,
        ),
        0 | 1 | 4 if mine.is_some() => {
            ("GET", format!("/homes/{}", mine.unwrap_or_default()), None)
        }
        2 => ("GET", "/homes".to_string(), None),
        _ => {
            let home = json!({
                "address": format!("{}{n}", marker(&args.tenant)),
                "city": ficus_demo::schema::CITIES[n as usize % ficus_demo::schema::CITIES.len()],
                "price": 100_000 + n as i64,
                "bedrooms": 1 + (n % 5) as i32,
            });
            ("POST", "/homes".to_string(), Some(home))
        }
    };
    let url = format!("{base}{path}");
    // Every save carries its request id as its idempotency key: the proxy may
    // then send it to the other instance of the rebuilt backend when one
    // fails, and the backend applies it once.
    let request = match &body {
        Some(b) => http
            .post(&url)
            .header(ficus_demo::backend::IDEMPOTENCY_HEADER, &id)
            .json(b),
        None => http.get(&url),
    };
    let mut record = Record {
        id: id.clone(),
        tenant: args.tenant.clone(),
        method: method.into(),
        path,
        sent_ms: now_ms(),
        done_ms: 0,
        status: None,
        error: None,
        ack: None,
        leak: None,
    };
    match request
        .header("host", &host)
        .header("x-request-id", &id)
        .send()
        .await
    {
        Err(e) => record.error = Some(error_chain(e)),
        Ok(r) => {
            let status = r.status();
            record.status = Some(status.as_u16());
            match r.json::<Value>().await {
                Err(e) if status.is_success() => {
                    record.error = Some(format!("unreadable answer: {}", error_chain(e)))
                }
                Err(_) => {}
                Ok(v) if !status.is_success() => {
                    record.error = Some(format!("{status}: {v}"));
                }
                Ok(v) => {
                    check(&args, &mut record, &v, body.as_ref());
                    if let Some(a) = &record.ack {
                        saved.lock().await.push(a.row);
                    }
                }
            }
        }
    }
    record.done_ms = now_ms();
    if let Ok(line) = serde_json::to_string(&record) {
        let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(log, "{line}");
    }
}

/// Checks an answer: every home it holds is the tenant's own, and a save names
/// the row it made.
fn check(args: &Args, record: &mut Record, answer: &Value, sent: Option<&Value>) {
    let homes: Vec<&Value> = match answer.get("homes").and_then(Value::as_array) {
        Some(list) => list.iter().collect(),
        None => vec![answer],
    };
    for h in homes {
        let address = h["address"].as_str().unwrap_or_default();
        if foreign(&args.tenant, args.zero, address) {
            record.leak = Some(format!("home {} ({address})", h["id"]));
        }
    }
    if let Some(sent) = sent {
        match answer["id"].as_i64() {
            Some(row) => {
                record.ack = Some(Ack {
                    row,
                    address: sent["address"].as_str().unwrap_or_default().to_string(),
                    city: sent["city"].as_str().unwrap_or_default().to_string(),
                    price: sent["price"].as_i64().unwrap_or_default(),
                    bedrooms: sent["bedrooms"].as_i64().unwrap_or_default() as i32,
                })
            }
            None => record.error = Some(format!("a save answered without an id: {answer}")),
        }
    }
}

/// An error with its causes, which is where reqwest says what really happened
/// (connection refused, reset, timed out): anyhow's alternate form writes the chain
/// as `error: cause: cause`.
fn error_chain(e: reqwest::Error) -> String {
    format!("{:#}", anyhow::Error::new(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_home_is_foreign_unless_it_is_marked_as_the_tenants_own() {
        let check = |tenant: &str, zero: bool, address: &str, expect: bool| {
            assert_eq!(foreign(tenant, zero, address), expect, "{tenant} {address}");
        };
        check("globex", false, "soak globex #12", false);
        check("globex", false, "soak globex-2 #12", true);
        check("globex", false, "12 Rua Augusta", true);
        check("acme-homes", true, "12 Rua Augusta", false);
        check("acme-homes", true, "soak acme-homes #3", false);
        check("acme-homes", true, "soak globex #3", true);
    }
}
