//! `flashsale-streams`: holds many server-sent event streams of one sale open
//! (benchmark step), on one thread so that it costs the machine it shares
//! with the server as little as it can.
//!
//! Opens `--count` streams of `/api/v1/sales/<sale>/events` on a loopback
//! server, prints `open <n>` once they are open, counts the events, and
//! notes when each stream first shows the sale sold out; a poller notes when
//! `GET /api/v1/sales/<sale>` first says so (the moment the last unit went,
//! to 20 ms). Bounded: stops after `--seconds` or on SIGTERM/SIGINT, then
//! writes a JSON summary to `--out`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

const SOLD_OUT: &[u8] = b"\"status\":\"sold_out\"";

#[derive(Parser)]
#[command(about = "Hold many event streams of one sale open")]
struct Args {
    /// The server, on loopback: e.g. 127.0.0.1:18080.
    #[arg(long)]
    addr: SocketAddr,
    #[arg(long)]
    sale: String,
    #[arg(long, default_value_t = 10_000)]
    count: usize,
    /// Longest run, in seconds.
    #[arg(long, default_value_t = 120)]
    seconds: u64,
    #[arg(long)]
    out: PathBuf,
}

#[derive(Default)]
struct Tally {
    open: AtomicUsize,
    errors: AtomicUsize,
    events: AtomicU64,
    /// When each stream first showed the sale sold out (Unix seconds).
    sold_out: Mutex<Vec<f64>>,
    last_unit_at: Mutex<Option<f64>>,
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

async fn stream(
    addr: SocketAddr,
    path: String,
    tally: Arc<Tally>,
    mut stop: watch::Receiver<bool>,
) {
    let Ok(mut conn) = TcpStream::connect(addr).await else {
        tally.errors.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n");
    if conn.write_all(request.as_bytes()).await.is_err() {
        tally.errors.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let mut buf = vec![0u8; 4096];
    let mut first = true;
    let mut seen_sold_out = false;
    // The tail of the last read, so that a mark split across reads is seen.
    let mut tail: Vec<u8> = Vec::new();
    loop {
        let n = tokio::select! {
            read = conn.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            _ = stop.changed() => break,
        };
        let data = &buf[..n];
        if first {
            first = false;
            if !data.starts_with(b"HTTP/1.1 200") {
                tally.errors.fetch_add(1, Ordering::Relaxed);
                return;
            }
            tally.open.fetch_add(1, Ordering::Relaxed);
        }
        let events = data.windows(7).filter(|w| w == b"\ndata: ").count();
        tally.events.fetch_add(events as u64, Ordering::Relaxed);
        if !seen_sold_out {
            tail.extend_from_slice(data);
            if contains(&tail, SOLD_OUT) {
                seen_sold_out = true;
                if let Ok(mut all) = tally.sold_out.lock() {
                    all.push(now());
                }
            }
            let keep = tail.len().saturating_sub(SOLD_OUT.len());
            tail.drain(..keep);
        }
    }
    if !first {
        tally.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Polls the sale's own view until it says no stock is left.
async fn poll(addr: SocketAddr, path: String, tally: Arc<Tally>, stop: watch::Receiver<bool>) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    while !*stop.borrow() {
        if let Ok(mut conn) = TcpStream::connect(addr).await {
            let mut body = Vec::new();
            if conn.write_all(request.as_bytes()).await.is_ok()
                && conn.read_to_end(&mut body).await.is_ok()
                && contains(&body, b"\"stock_left\":0,")
            {
                if let Ok(mut at) = tally.last_unit_at.lock() {
                    *at = Some(now());
                }
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    if !args.addr.ip().is_loopback() {
        eprintln!("flashsale-streams: loopback targets only");
        return ExitCode::from(2);
    }
    let tally = Arc::new(Tally::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let path = format!("/api/v1/sales/{}/events", args.sale);
    for i in 0..args.count {
        tokio::spawn(stream(
            args.addr,
            path.clone(),
            tally.clone(),
            stop_rx.clone(),
        ));
        if i % 500 == 499 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tally.open.load(Ordering::Relaxed) + tally.errors.load(Ordering::Relaxed) < args.count
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("open {}", tally.open.load(Ordering::Relaxed));
    let poller = tokio::spawn(poll(
        args.addr,
        format!("/api/v1/sales/{}", args.sale),
        tally.clone(),
        stop_rx.clone(),
    ));
    let stopped = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(args.seconds), stopped).await;
    let open_at_end = tally.open.load(Ordering::Relaxed);
    let _ = stop_tx.send(true);
    poller.abort();
    let mut seen = tally.sold_out.lock().map(|v| v.clone()).unwrap_or_default();
    seen.sort_by(f64::total_cmp);
    let at = tally.last_unit_at.lock().ok().and_then(|a| *a);
    let lag = |v: Option<&f64>| match (v, at) {
        (Some(t), Some(a)) => serde_json::json!(t - a),
        _ => serde_json::Value::Null,
    };
    let summary = serde_json::json!({
        "requested": args.count,
        "open_at_end": open_at_end,
        "errors": tally.errors.load(Ordering::Relaxed),
        "events": tally.events.load(Ordering::Relaxed),
        "saw_sold_out": seen.len(),
        "last_unit_at": at,
        "max_lag_s": lag(seen.last()),
        "median_lag_s": lag(seen.get(seen.len() / 2)),
    });
    if std::fs::write(&args.out, summary.to_string()).is_err() {
        eprintln!("flashsale-streams: cannot write {}", args.out.display());
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}
