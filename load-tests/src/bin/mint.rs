//! `flashsale-mint`: writes shopper tokens, one per line, signed with the
//! server's configured JWT secret, each for a distinct new user id. Load runs
//! use them to be many distinct buyers without registering each one.

use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use flashsale::auth::TokenKeys;
use flashsale::config::{Overrides, Settings};

#[derive(Parser)]
#[command(about = "Mint shopper tokens for load runs")]
struct Args {
    /// Server configuration whose `auth` section signs the tokens
    /// (environment overrides apply as for the server).
    #[arg(long)]
    config: Option<PathBuf>,
    /// How many tokens (one user each).
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// Output file, one token per line.
    #[arg(long)]
    out: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let settings = match Settings::load(args.config.as_deref(), &Overrides::default()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("flashsale-mint: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let keys = TokenKeys::new(&settings.auth);
    let file = match std::fs::File::create(&args.out) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("flashsale-mint: {}: {e}", args.out.display());
            return ExitCode::from(1);
        }
    };
    let mut out = BufWriter::new(file);
    for _ in 0..args.count {
        let token = match keys.issue(uuid::Uuid::new_v4()) {
            Ok((t, _)) => t,
            Err(e) => {
                eprintln!("flashsale-mint: {e}");
                return ExitCode::from(1);
            }
        };
        if writeln!(out, "{token}").is_err() {
            eprintln!("flashsale-mint: cannot write {}", args.out.display());
            return ExitCode::from(1);
        }
    }
    if out.flush().is_err() {
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}
