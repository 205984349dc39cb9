//! Benchmark: how long the longest single decision of a stock actor takes
//! while its sale's book grows, a new buyer per reservation (each
//! confirmed at once, as the order log would).
//!
//! A stock actor decides every purchase of its sale in turn, so its
//! longest decision is a stall for every buyer of the sale. Run:
//!
//! ```sh
//! cargo run --release --example book_growth -- 2000000
//! cargo run --release --example book_growth -- 2000000 restore
//! ```
//!
//! With `restore` it then rebuilds a book from those orders, shuffled (as
//! recovery reads them from a parallel scan), and reports the time and the
//! process's resident memory (Linux) before and after.

use std::time::{Duration, Instant};

use chrono::Utc;
use flashsale::domain::sale::{Sale, SaleSpec};
use flashsale::domain::sale_book::{Reserved, SaleBook};
use rand::seq::SliceRandom;
use uuid::Uuid;

fn main() {
    let orders: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(2_000_000);
    let now = Utc::now();
    let sale = Sale {
        id: Uuid::now_v7(),
        spec: SaleSpec {
            name: "growth".into(),
            description: String::new(),
            price_cents: 100,
            currency: "EUR".into(),
            stock_total: i64::try_from(orders).unwrap_or(i64::MAX),
            per_user_limit: 1,
            starts_at: now - chrono::Duration::hours(1),
            ends_at: now + chrono::Duration::hours(1),
            reservation_ttl_secs: 600,
        },
        paused: false,
        created_at: now,
        updated_at: now,
    };
    let restore = std::env::args().nth(2).as_deref() == Some("restore");
    let mut book = SaleBook::new(sale.clone());
    let mut made = Vec::new();
    let mut took: Vec<Duration> = Vec::with_capacity(orders);
    let started = Instant::now();
    for _ in 0..orders {
        let t = Instant::now();
        if let Ok(Reserved::New(order)) = book.reserve(Uuid::new_v4(), 1, None, now) {
            book.confirm(order.id);
            took.push(t.elapsed());
            if restore {
                made.push(order);
            }
        }
    }
    let total = started.elapsed();
    let slow: Vec<Duration> = took
        .iter()
        .copied()
        .filter(|d| *d >= Duration::from_millis(1))
        .collect();
    took.sort_unstable();
    let at = |q: f64| took.get(((took.len() as f64) * q) as usize).copied();
    println!(
        "{orders} reservations in {total:.2?}; longest {:.2?}; p99.99 {:.2?}; {} took 1 ms or more, {:.2?} in all",
        took.last().copied().unwrap_or_default(),
        at(0.9999).unwrap_or_default(),
        slow.len(),
        slow.iter().sum::<Duration>(),
    );
    println!(
        "resident memory with the book: {} MiB",
        resident_mib("VmRSS")
    );
    if restore {
        drop(book);
        made.shuffle(&mut rand::thread_rng());
        let before = resident_mib("VmRSS");
        let started = Instant::now();
        let book = SaleBook::restore(sale, made);
        println!(
            "restored {} orders in {:.2?}; resident memory {before} MiB before, {} MiB after, peak {} MiB",
            book.orders_in_play(),
            started.elapsed(),
            resident_mib("VmRSS"),
            resident_mib("VmHWM"),
        );
    }
}

/// A field of /proc/self/status, in MiB (0 where there is none).
fn resident_mib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib / 1024)
}
