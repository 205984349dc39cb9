//! The binary as a user runs it: unreachable services stop it with one clear
//! line; `migrate` prepares a database on its own.

use std::process::Command;

use crate::helpers::{cleanup, db_name, server_command, test_settings};
use secrecy::ExposeSecret;

/// Runs the binary with the test's settings plus `extra`, and returns
/// (exit code, stderr).
fn run(
    settings: &flashsale::config::Settings,
    args: &[&str],
    extra: &[(&str, &str)],
) -> (i32, String) {
    let mut cmd = server_command(settings, 0);
    cmd.args(args)
        .env("FLASHSALE__DATABASE__CONNECT_TIMEOUT_MS", "1500")
        .env("FLASHSALE__REDIS__CONNECT_TIMEOUT_MS", "1500")
        .env("FLASHSALE__RABBITMQ__CONNECT_TIMEOUT_MS", "1500");
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run the server binary: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[actix_web::test]
async fn an_unreachable_service_stops_start_up_with_a_clear_line() {
    let settings = test_settings();
    let cases = [
        (
            "FLASHSALE__DATABASE__URL",
            "postgres://postgres@127.0.0.1:1/x",
            "PostgreSQL",
            "database.url",
        ),
        (
            "FLASHSALE__REDIS__URL",
            "redis://127.0.0.1:1",
            "Redis",
            "redis.url",
        ),
        (
            "FLASHSALE__RABBITMQ__URL",
            "amqp://guest:guest@127.0.0.1:1/%2f",
            "RabbitMQ",
            "rabbitmq.url",
        ),
    ];
    for (key, value, service, config_key) in cases {
        let (code, stderr) = run(&settings, &[], &[(key, value)]);
        assert_ne!(code, 0, "{service}: {stderr}");
        assert!(stderr.contains(service), "{service}: {stderr}");
        assert!(stderr.contains(config_key), "{service}: {stderr}");
        assert!(stderr.contains("127.0.0.1:1"), "{service}: {stderr}");
        assert!(!stderr.contains("panicked"), "{service}: {stderr}");
        assert!(
            !stderr.contains("guest:guest"),
            "credentials leaked: {stderr}"
        );
    }
    cleanup(&settings).await;
}

#[actix_web::test]
async fn migrate_creates_and_migrates_the_database() {
    let settings = test_settings();
    let (code, stderr) = run(&settings, &["migrate"], &[]);
    assert_eq!(code, 0, "{stderr}");
    let (client, conn) =
        tokio_postgres::connect(settings.database.url.expose_secret(), tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("database {} must exist: {e}", db_name(&settings)));
    actix_web::rt::spawn(conn);
    for table in ["users", "sales", "orders"] {
        let row = client
            .query_one("SELECT to_regclass($1)::text", &[&table])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(row.get::<_, Option<String>>(0).as_deref(), Some(table));
    }
    drop(client);
    // Running it again is harmless.
    let (code, stderr) = run(&settings, &["migrate"], &[]);
    assert_eq!(code, 0, "{stderr}");
    cleanup(&settings).await;
}

#[test]
fn a_bad_config_file_stops_start_up() {
    let path = std::env::temp_dir().join(format!("flashsale-bad-{}.toml", uuid::Uuid::new_v4()));
    std::fs::write(&path, "[server]\nprot = 1\n").unwrap_or_else(|e| panic!("{e}"));
    let out = Command::new(crate::helpers::SERVER_BIN)
        .args(["--config", path.to_str().unwrap_or_default()])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let _ = std::fs::remove_file(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("prot"), "{stderr}");
}
