//! `flashsale-load`: runs one goose scenario against a flashsale server on
//! 127.0.0.1 and checks the invariants afterwards; exits non-zero if they do
//! not hold, whatever the speed. goose's own options (`--users`,
//! `--run-time`, `--increase-rate`, `--throttle-requests`, `--report-file`...)
//! are accepted as well.
//!
//!     flashsale-load --scenario rush --users 200 --increase-rate 200 --run-time 20s

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use flashsale::auth::TokenKeys;
use flashsale::config::{Overrides, Settings};
use flashsale_load_tests::{run, RunConfig, ScenarioKind};
use goose::config::GooseConfiguration;
use secrecy::ExposeSecret;

#[derive(Parser)]
#[command(name = "flashsale-load", about = "goose scenarios for flashsale")]
struct Cli {
    /// rush, sold-out-storm, browse or lifecycle.
    #[arg(long)]
    scenario: ScenarioKind,
    /// The server's configuration (JWT secret, admin token, database URL,
    /// port); environment overrides apply as for the server.
    #[arg(long)]
    server_config: Option<PathBuf>,
    /// Distinct buyers to mint.
    #[arg(long, default_value_t = 10_000)]
    buyers: usize,
    /// Units on sale (rush, lifecycle).
    #[arg(long, default_value_t = 1_000)]
    stock: u32,
    /// Seconds from the start of the run to the sale's start (rush).
    #[arg(long, default_value_t = 3)]
    start_delay: u32,
    /// Reservation lifetime in seconds (lifecycle).
    #[arg(long, default_value_t = 3)]
    reservation_ttl: u32,
    #[command(flatten)]
    goose: GooseConfiguration,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load(cli.server_config.as_deref(), &Overrides::default()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("flashsale-load: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let host = cli
        .goose
        .host
        .clone()
        .unwrap_or_else(|| format!("http://127.0.0.1:{}", settings.server.port));
    if !(host.starts_with("http://127.0.0.1") || host.starts_with("http://localhost")) {
        eprintln!("flashsale-load: load runs target 127.0.0.1 only, not {host}");
        return ExitCode::from(2);
    }
    if settings.storage.mode != flashsale::config::StorageMode::Services {
        eprintln!(
            "flashsale-load: the invariant check reads PostgreSQL; give a server config in services mode ([storage] mode = \"services\", as load-tests/bench.toml has)"
        );
        return ExitCode::from(2);
    }
    let keys = TokenKeys::new(&settings.auth);
    let tokens: Vec<String> = (0..cli.buyers.max(1))
        .filter_map(|_| keys.issue(uuid::Uuid::new_v4()).ok().map(|(t, _)| t))
        .collect();
    let cfg = RunConfig {
        scenario: cli.scenario,
        host: host.clone(),
        admin_token: settings.auth.admin_token.expose_secret().to_owned(),
        tokens,
        database_url: settings.database.url.expose_secret().to_owned(),
        stock: cli.stock,
        start_delay_secs: cli.start_delay,
        reservation_ttl_secs: cli.reservation_ttl,
    };
    let mut goose = cli.goose;
    goose.host = Some(host);
    match run(cfg, goose).await {
        Ok(report) => {
            println!(
                "invariants hold: {} orders answered 201, all in PostgreSQL; answers by status: {:?}",
                report.orders_created, report.statuses
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("flashsale-load: FAILED: {e:#}");
            ExitCode::from(1)
        }
    }
}
