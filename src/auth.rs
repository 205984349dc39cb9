//! Who is calling: shopper tokens (JWT, HS256), password hashes (argon2id)
//! and the admin token.
//!
//! Tokens are verified on every shopper request, so verification is a pure
//! CPU check with no database round trip. Only HS256 is accepted, with a
//! required `exp`, `sub` and our own `iss`: `alg: none`, other algorithms,
//! foreign issuers and expired tokens are all refused.

use argon2::password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, SaltString};
use argon2::{Algorithm as ArgonAlgorithm, Argon2, Params, PasswordVerifier, Version};
use chrono::{DateTime, Utc};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use crate::config::AuthSettings;

/// The claims of a shopper token.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: Uuid,
    pub iss: String,
    pub iat: i64,
    pub exp: i64,
}

/// Why a bearer token was refused. Only logged: the caller sees one answer.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("no bearer token")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(#[from] jsonwebtoken::errors::Error),
}

/// Issues and verifies shopper tokens.
pub struct TokenKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    issuer: String,
    ttl_secs: i64,
}

impl TokenKeys {
    pub fn new(settings: &AuthSettings) -> Self {
        let secret = settings.jwt_secret.expose_secret().as_bytes();
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[settings.jwt_issuer.as_str()]);
        validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        validation.leeway = 5;
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            issuer: settings.jwt_issuer.clone(),
            ttl_secs: i64::try_from(settings.token_ttl_secs).unwrap_or(i64::MAX / 4),
        }
    }

    /// A signed token for `user_id` and the moment it expires.
    pub fn issue(&self, user_id: Uuid) -> Result<(String, DateTime<Utc>), TokenError> {
        let now = Utc::now();
        let exp = now + chrono::Duration::seconds(self.ttl_secs);
        let claims = Claims {
            sub: user_id,
            iss: self.issuer.clone(),
            iat: now.timestamp(),
            exp: exp.timestamp(),
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)?;
        Ok((token, exp))
    }

    /// The user id a valid token was issued to.
    pub fn verify(&self, token: &str) -> Result<Uuid, TokenError> {
        Ok(self.verify_claims(token)?.sub)
    }

    /// The claims of a valid token.
    pub fn verify_claims(&self, token: &str) -> Result<Claims, TokenError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)?;
        Ok(data.claims)
    }

    /// Seconds past `exp` that a token is still accepted (clock skew).
    pub fn leeway_secs(&self) -> i64 {
        i64::try_from(self.validation.leeway).unwrap_or(0)
    }
}

/// Hashes and checks passwords with argon2id at the configured cost.
pub struct Passwords {
    params: Params,
    /// A real hash of a random password, verified against when the username
    /// does not exist, so that a login takes as long either way.
    decoy: String,
}

impl Passwords {
    pub fn new(settings: &AuthSettings) -> Result<Self, argon2::Error> {
        let params = Params::new(
            settings.argon2_memory_kib,
            settings.argon2_iterations,
            settings.argon2_parallelism,
            None,
        )?;
        let mut p = Self {
            params,
            decoy: String::new(),
        };
        p.decoy = p
            .hash(&Uuid::new_v4().to_string())
            .map_err(|_| argon2::Error::AlgorithmInvalid)?;
        Ok(p)
    }

    fn argon2(&self) -> Argon2<'static> {
        Argon2::new(
            ArgonAlgorithm::Argon2id,
            Version::V0x13,
            self.params.clone(),
        )
    }

    /// A PHC-format hash string with a fresh salt.
    pub fn hash(&self, password: &str) -> Result<String, argon2::password_hash::Error> {
        let salt = SaltString::generate(&mut OsRng);
        Ok(self
            .argon2()
            .hash_password(password.as_bytes(), &salt)?
            .to_string())
    }

    /// Whether `password` matches `hash`; `None` checks against the decoy and
    /// always answers false, in the same time.
    pub fn verify(&self, password: &str, hash: Option<&str>) -> bool {
        let stored = hash.unwrap_or(&self.decoy);
        let Ok(parsed) = PasswordHash::new(stored) else {
            return false;
        };
        let ok = self
            .argon2()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok();
        ok && hash.is_some()
    }
}

/// Why a password could not be checked now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PasswordBusy {
    /// Every hashing thread is busy and the queue is full: try again shortly.
    #[error("every password hasher is busy")]
    Full,
    /// The pool has stopped (the server is shutting down).
    #[error("the password hashers have stopped")]
    Stopped,
}

enum PasswordJob {
    Hash {
        password: String,
        reply: tokio::sync::oneshot::Sender<Option<String>>,
    },
    Verify {
        password: String,
        hash: Option<String>,
        reply: tokio::sync::oneshot::Sender<bool>,
    },
}

/// Password hashing, bounded: `threads` threads of its own each compute one
/// argon2 hash at a time, and at most `queue` requests wait for one; past
/// that a caller is told [`PasswordBusy::Full`] at once (HTTP 503
/// `overloaded`), before any memory is spent.
///
/// An argon2id hash at the shipped cost takes 19 MiB for its duration. On a
/// shared pool of hundreds of blocking threads a login flood ran hundreds at
/// once and the allocator kept every thread's 19 MiB afterwards (measured:
/// 17.6 GB resident after 1,000 logins, 100 at a time). With a few threads
/// of its own the memory is `threads` times the cost, whatever the flood.
pub struct PasswordPool {
    jobs: std::sync::mpsc::SyncSender<PasswordJob>,
    /// Threads (for status and sizing).
    pub threads: usize,
}

impl PasswordPool {
    /// Starts `threads` hashing threads (0: one per core) sharing a queue of
    /// `queue` waiting requests. They end when the pool is dropped.
    pub fn start(passwords: Passwords, threads: usize, queue: usize) -> std::io::Result<Self> {
        let threads = match threads {
            0 => std::thread::available_parallelism().map_or(2, usize::from),
            n => n,
        };
        let (jobs, rx) = std::sync::mpsc::sync_channel::<PasswordJob>(queue);
        let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
        let passwords = std::sync::Arc::new(passwords);
        for i in 0..threads {
            let (rx, passwords) = (rx.clone(), passwords.clone());
            std::thread::Builder::new()
                .name(format!("password-{i}"))
                .spawn(move || loop {
                    let job = match rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    match job {
                        Ok(PasswordJob::Hash { password, reply }) => {
                            let _ = reply.send(passwords.hash(&password).ok());
                        }
                        Ok(PasswordJob::Verify {
                            password,
                            hash,
                            reply,
                        }) => {
                            let _ = reply.send(passwords.verify(&password, hash.as_deref()));
                        }
                        Err(_) => return,
                    }
                })?;
        }
        Ok(PasswordPool { jobs, threads })
    }

    fn submit(&self, job: PasswordJob) -> Result<(), PasswordBusy> {
        self.jobs.try_send(job).map_err(|e| match e {
            std::sync::mpsc::TrySendError::Full(_) => PasswordBusy::Full,
            std::sync::mpsc::TrySendError::Disconnected(_) => PasswordBusy::Stopped,
        })
    }

    /// A PHC-format hash of `password` with a fresh salt.
    pub async fn hash(&self, password: String) -> Result<String, PasswordBusy> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.submit(PasswordJob::Hash { password, reply })?;
        answer.await.ok().flatten().ok_or(PasswordBusy::Stopped)
    }

    /// Whether `password` matches `hash` (`None`: the decoy, always false,
    /// in the same time).
    pub async fn verify(
        &self,
        password: String,
        hash: Option<String>,
    ) -> Result<bool, PasswordBusy> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.submit(PasswordJob::Verify {
            password,
            hash,
            reply,
        })?;
        answer.await.map_err(|_| PasswordBusy::Stopped)
    }
}

/// Checks the admin bearer token in constant time.
pub struct AdminToken(SecretString);

impl AdminToken {
    pub fn new(token: SecretString) -> Self {
        Self(token)
    }

    pub fn matches(&self, presented: &str) -> bool {
        let expected = self.0.expose_secret().as_bytes();
        bool::from(expected.ct_eq(presented.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Overrides, Settings};

    fn settings() -> AuthSettings {
        let mut s = Settings::load_without_env(None, &Overrides::default())
            .unwrap_or_else(|e| panic!("{e}"))
            .auth;
        s.argon2_memory_kib = 64;
        s.argon2_iterations = 1;
        s
    }

    #[test]
    fn tokens_round_trip_and_refuse_tampering() {
        let keys = TokenKeys::new(&settings());
        let id = Uuid::new_v4();
        let (token, exp) = keys.issue(id).unwrap_or_else(|e| panic!("{e}"));
        assert!(exp > Utc::now());
        assert_eq!(keys.verify(&token).ok(), Some(id));
        let mut tampered = token.clone();
        tampered.pop();
        tampered.push(if token.ends_with('A') { 'B' } else { 'A' });
        assert!(keys.verify(&tampered).is_err());
    }

    #[test]
    fn foreign_issuer_and_other_secret_are_refused() {
        let mine = TokenKeys::new(&settings());
        let mut other = settings();
        other.jwt_issuer = "someone-else".into();
        let (foreign, _) = TokenKeys::new(&other)
            .issue(Uuid::new_v4())
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(mine.verify(&foreign).is_err());
        let mut other = settings();
        other.jwt_secret = SecretString::from("another-secret-entirely-0123456789");
        let (forged, _) = TokenKeys::new(&other)
            .issue(Uuid::new_v4())
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(mine.verify(&forged).is_err());
    }

    #[test]
    fn passwords_verify() {
        let p = Passwords::new(&settings()).unwrap_or_else(|e| panic!("{e}"));
        let h = p.hash("correct horse").unwrap_or_else(|e| panic!("{e}"));
        assert!(p.verify("correct horse", Some(&h)));
        assert!(!p.verify("wrong horse", Some(&h)));
        assert!(!p.verify("correct horse", None));
    }

    #[test]
    fn admin_token_compares() {
        let t = AdminToken::new(SecretString::from("s3cret"));
        assert!(t.matches("s3cret"));
        assert!(!t.matches("s3cre"));
        assert!(!t.matches("s3cret!"));
        assert!(!t.matches(""));
    }
}
