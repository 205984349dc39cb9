//! The flashsale binary: parses the command line and runs the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use flashsale::config::{Overrides, Settings};
use flashsale::startup::{self, Application};

/// mimalloc instead of the system allocator. A durable reservation
/// allocates and frees across threads (an HTTP worker builds the request,
/// the pipeline thread the order and its batch, the worker again the
/// answer); glibc's malloc spent about a tenth of the server's CPU on it
/// in a profile of the reservation benchmark.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "flashsale", version, about = "A flash-sale server")]
struct Cli {
    /// Configuration file layered over the shipped defaults
    /// (default: ./config.toml when it exists).
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// Address to bind (overrides server.host).
    #[arg(long, global = true)]
    host: Option<String>,
    /// Port to bind (overrides server.port).
    #[arg(long, global = true)]
    port: Option<u16>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve HTTP (the default).
    Serve,
    /// Create the database if configured to, apply migrations, and exit.
    Migrate,
    /// Print fresh random values for every secret, as environment lines.
    Secrets,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let file = cli.config.clone().or_else(|| {
        let local = PathBuf::from("config.toml");
        local.exists().then_some(local)
    });
    let overrides = Overrides {
        host: cli.host,
        port: cli.port,
    };
    let settings = match Settings::load(file.as_deref(), &overrides) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("flashsale: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let telemetry = flashsale::telemetry::init(&settings.telemetry);
    let system = actix_web::rt::System::new();
    let code = system.block_on(async move {
        match cli.command.unwrap_or(Command::Serve) {
            Command::Secrets => {
                print!("{}", flashsale::config::fresh_secrets());
                ExitCode::SUCCESS
            }
            Command::Migrate => match startup::migrate(&settings).await {
                Ok(()) => {
                    tracing::info!("migrations applied");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("flashsale: {e}");
                    ExitCode::from(1)
                }
            },
            Command::Serve => {
                let app = match Application::build(settings).await {
                    Ok(app) => app,
                    Err(e) => {
                        eprintln!("flashsale: {e}");
                        return ExitCode::from(1);
                    }
                };
                match app.run_until_stopped().await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("flashsale: server error: {e}");
                        ExitCode::from(1)
                    }
                }
            }
        }
    });
    telemetry.shutdown();
    code
}
