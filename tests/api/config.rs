//! Configuration loading: the shipped file, unknown keys, the layers.

use std::io::Write;

use flashsale::config::{Overrides, Settings};

fn temp_config(contents: &str) -> tempfile_path::TempPath {
    tempfile_path::write(contents)
}

/// A tiny temporary-file helper (the test binary needs no extra crate for it).
mod tempfile_path {
    use std::path::PathBuf;

    pub struct TempPath(pub PathBuf);

    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    pub fn write(contents: &str) -> TempPath {
        let path = std::env::temp_dir().join(format!("flashsale-{}.toml", uuid::Uuid::new_v4()));
        let mut f = std::fs::File::create(&path).unwrap_or_else(|e| panic!("{e}"));
        super::Write::write_all(&mut f, contents.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        TempPath(path)
    }
}

#[test]
fn the_shipped_config_file_loads() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml");
    let settings = Settings::load_without_env(Some(&path), &Overrides::default())
        .unwrap_or_else(|e| panic!("config.toml must load: {e}"));
    assert_eq!(settings.server.host, "127.0.0.1");
    assert_eq!(settings.redis.key_prefix, "flashsale");
}

#[test]
fn unknown_keys_are_rejected() {
    let file = temp_config("[server]\nprot = 9000\n");
    let err = Settings::load_without_env(Some(&file.0), &Overrides::default())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("prot"), "{err}");
    let file = temp_config("[nonsense]\nkey = 1\n");
    let err = Settings::load_without_env(Some(&file.0), &Overrides::default())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("nonsense"), "{err}");
}

#[test]
fn a_file_overrides_defaults_and_flags_override_the_file() {
    let file = temp_config("[server]\nport = 9100\nworkers = 3\n");
    let settings = Settings::load_without_env(Some(&file.0), &Overrides::default())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(settings.server.port, 9100);
    assert_eq!(settings.server.workers, 3);
    assert_eq!(
        settings.server.host, "127.0.0.1",
        "untouched keys keep their defaults"
    );
    let flags = Overrides {
        port: Some(9200),
        host: None,
    };
    let settings =
        Settings::load_without_env(Some(&file.0), &flags).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(settings.server.port, 9200);
}

#[test]
fn bad_values_are_rejected() {
    for bad in [
        "[sales]\ndefault_currency = \"usd\"\n",
        "[sales]\ndefault_per_user_limit = 0\n",
        "[telemetry]\nlog_format = \"xml\"\n",
        "[server]\nport = \"eighty\"\n",
    ] {
        let file = temp_config(bad);
        assert!(
            Settings::load_without_env(Some(&file.0), &Overrides::default()).is_err(),
            "{bad}"
        );
    }
}
