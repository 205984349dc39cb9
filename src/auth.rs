//! Who is calling: shopper tokens (JWT, HS256), password hashes (argon2id)
//! and the admin token.
//!
//! Tokens are verified on every shopper request, so verification is a pure
//! CPU check with no database round trip. Only HS256 is accepted, with a
//! required `exp`, `sub` and our own `iss`: `alg: none`, other algorithms,
//! foreign issuers and expired tokens are all refused.
//!
//! Every durable reservation brings a token seen for the first time, so
//! verification is on the hot path: a token with the very header this server
//! issues is checked against an HMAC keyed once (`OwnTokens`); any other
//! token goes through `jsonwebtoken`, which decides with the same rules.

use argon2::password_hash::{rand_core::OsRng, PasswordHash, SaltString};
use argon2::{Algorithm as ArgonAlgorithm, Argon2, Params, Version};
use base64::Engine as _;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
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
    /// `None` only if the header could not be written (it always can).
    own: Option<OwnTokens>,
}

/// The check of tokens that carry the header this server issues: HS256 with
/// the HMAC keyed once. `jsonwebtoken` keys a fresh HMAC and parses the
/// header as JSON for every token, which was a tenth of an HTTP worker's
/// time in a run of durable reservations (each with a new buyer's token).
struct OwnTokens {
    /// The first segment of every token `TokenKeys::issue` signs.
    header: String,
    mac: Hmac<Sha256>,
}

fn refused(kind: ErrorKind) -> TokenError {
    TokenError::Invalid(kind.into())
}

/// The longest payload segment the pre-keyed check decodes on the stack;
/// a longer one goes through `jsonwebtoken`.
const OWN_PAYLOAD_MAX: usize = 512;

impl OwnTokens {
    /// `Some` when `token` has our header: its claims, or why it is refused.
    /// `None` for any other shape, left to `jsonwebtoken`.
    fn verify(&self, token: &str, issuer: &str, leeway: i64) -> Option<Result<Claims, TokenError>> {
        let rest = token
            .strip_prefix(self.header.as_str())?
            .strip_prefix('.')?;
        let (payload, signature) = rest.split_once('.')?;
        let signed = &token[..self.header.len() + 1 + payload.len()];
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut sig = [0u8; 32];
        if b64.decode_slice(signature, &mut sig).ok()? != sig.len() {
            return None;
        }
        let mut mac = self.mac.clone();
        mac.update(signed.as_bytes());
        if mac.verify_slice(&sig).is_err() {
            return Some(Err(refused(ErrorKind::InvalidSignature)));
        }
        let mut buf = [0u8; OWN_PAYLOAD_MAX];
        let n = b64.decode_slice(payload, &mut buf).ok()?;
        let claims: Claims = serde_json::from_slice(&buf[..n]).ok()?;
        if claims.exp < Utc::now().timestamp().saturating_sub(leeway) {
            return Some(Err(refused(ErrorKind::ExpiredSignature)));
        }
        if claims.iss != issuer {
            return Some(Err(refused(ErrorKind::InvalidIssuer)));
        }
        Some(Ok(claims))
    }
}

impl TokenKeys {
    pub fn new(settings: &AuthSettings) -> Self {
        let secret = settings.jwt_secret.expose_secret().as_bytes();
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[settings.jwt_issuer.as_str()]);
        validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        validation.leeway = 5;
        let encoding = EncodingKey::from_secret(secret);
        // The header segment exactly as `issue` writes it, and the HMAC
        // (which takes a key of any length).
        let own = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &(), &encoding)
            .ok()
            .and_then(|t| Some(t.split_once('.')?.0.to_owned()))
            .zip(<Hmac<Sha256> as Mac>::new_from_slice(secret).ok())
            .map(|(header, mac)| OwnTokens { header, mac });
        Self {
            encoding,
            decoding: DecodingKey::from_secret(secret),
            validation,
            issuer: settings.jwt_issuer.clone(),
            ttl_secs: i64::try_from(settings.token_ttl_secs).unwrap_or(i64::MAX / 4),
            own,
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
        let own = self.own.as_ref();
        if let Some(checked) = own.and_then(|o| o.verify(token, &self.issuer, self.leeway_secs())) {
            return checked;
        }
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

/// The memory argon2 works in, kept by a hashing thread from one hash to
/// the next. Allocated per hash (19 MiB at the shipped cost), it left the
/// allocator holding several such blocks per thread arena: a 400-way login
/// flood took the server to 427 MiB resident. Reused, it is one block per
/// hashing thread.
#[derive(Default)]
pub struct HashMemory(Vec<argon2::Block>);

impl HashMemory {
    fn blocks(&mut self, count: usize) -> &mut [argon2::Block] {
        if self.0.len() < count {
            self.0.resize(count, argon2::Block::default());
        }
        &mut self.0[..count]
    }
}

/// Why a password could not be hashed.
#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error(transparent)]
    Argon2(#[from] argon2::Error),
    #[error(transparent)]
    Format(#[from] argon2::password_hash::Error),
}

impl Passwords {
    pub fn new(settings: &AuthSettings) -> Result<Self, HashError> {
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
        p.decoy = p.hash(&Uuid::new_v4().to_string(), &mut HashMemory::default())?;
        Ok(p)
    }

    /// A PHC-format hash string with a fresh salt.
    pub fn hash(&self, password: &str, memory: &mut HashMemory) -> Result<String, HashError> {
        let salt = SaltString::generate(&mut OsRng);
        let mut salt_buf = [0u8; 64];
        let salt_bytes = salt.decode_b64(&mut salt_buf)?;
        let mut out = [0u8; 32];
        let argon2 = Argon2::new(
            ArgonAlgorithm::Argon2id,
            Version::V0x13,
            self.params.clone(),
        );
        argon2.hash_password_into_with_memory(
            password.as_bytes(),
            salt_bytes,
            &mut out,
            memory.blocks(self.params.block_count()),
        )?;
        let phc = PasswordHash {
            algorithm: argon2::ARGON2ID_IDENT,
            version: Some(Version::V0x13.into()),
            params: (&self.params).try_into()?,
            salt: Some(salt.as_salt()),
            hash: Some(argon2::password_hash::Output::new(&out)?),
        };
        Ok(phc.to_string())
    }

    /// Whether `password` matches `hash`; `None` checks against the decoy and
    /// always answers false, in the same time.
    pub fn verify(&self, password: &str, hash: Option<&str>, memory: &mut HashMemory) -> bool {
        let stored = hash.unwrap_or(&self.decoy);
        let matches = (|| -> Result<bool, HashError> {
            let parsed = PasswordHash::new(stored)?;
            if parsed.algorithm != argon2::ARGON2ID_IDENT {
                return Ok(false);
            }
            let params = Params::try_from(&parsed)?;
            let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
                return Ok(false);
            };
            let mut salt_buf = [0u8; 64];
            let salt_bytes = salt.decode_b64(&mut salt_buf)?;
            let mut out = vec![0u8; expected.len()];
            let argon2 = Argon2::new(ArgonAlgorithm::Argon2id, Version::V0x13, params.clone());
            argon2.hash_password_into_with_memory(
                password.as_bytes(),
                salt_bytes,
                &mut out,
                memory.blocks(params.block_count()),
            )?;
            Ok(bool::from(expected.as_bytes().ct_eq(&out)))
        })()
        .unwrap_or(false);
        matches && hash.is_some()
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
    jobs: std::sync::Mutex<std::sync::mpsc::Sender<PasswordJob>>,
    /// One permit for each hash being computed or waiting: `threads + queue`.
    slots: std::sync::Arc<tokio::sync::Semaphore>,
}

/// A place in the password pool, held from before the database is asked
/// for the user until the hash is done: a flood past the pool's capacity is
/// refused before it costs a query or a byte of hashing memory.
pub struct PasswordSlot<'a> {
    pool: &'a PasswordPool,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl PasswordPool {
    /// Starts `threads` hashing threads (0: one per core) sharing a queue of
    /// `queue` waiting requests. They end when the pool is dropped.
    pub fn start(passwords: Passwords, threads: usize, queue: usize) -> std::io::Result<Self> {
        let threads = match threads {
            0 => std::thread::available_parallelism().map_or(2, usize::from),
            n => n,
        };
        // Unbounded as a channel, bounded by the slots: at most
        // `threads + queue` jobs exist at once.
        let (jobs, rx) = std::sync::mpsc::channel::<PasswordJob>();
        let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
        let passwords = std::sync::Arc::new(passwords);
        for i in 0..threads {
            let (rx, passwords) = (rx.clone(), passwords.clone());
            std::thread::Builder::new()
                .name(format!("password-{i}"))
                .spawn(move || {
                    let mut memory = HashMemory::default();
                    loop {
                        let job = match rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(PasswordJob::Hash { password, reply }) => {
                                let _ = reply.send(passwords.hash(&password, &mut memory).ok());
                            }
                            Ok(PasswordJob::Verify {
                                password,
                                hash,
                                reply,
                            }) => {
                                let ok = passwords.verify(&password, hash.as_deref(), &mut memory);
                                let _ = reply.send(ok);
                            }
                            Err(_) => return,
                        }
                    }
                })?;
        }
        Ok(PasswordPool {
            jobs: std::sync::Mutex::new(jobs),
            slots: std::sync::Arc::new(tokio::sync::Semaphore::new(threads + queue)),
        })
    }

    /// A place for one hash, or [`PasswordBusy::Full`] at once.
    pub fn reserve(&self) -> Result<PasswordSlot<'_>, PasswordBusy> {
        let permit = self
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| PasswordBusy::Full)?;
        Ok(PasswordSlot {
            pool: self,
            _permit: permit,
        })
    }

    fn submit(&self, job: PasswordJob) -> Result<(), PasswordBusy> {
        self.jobs
            .lock()
            .map_err(|_| PasswordBusy::Stopped)?
            .send(job)
            .map_err(|_| PasswordBusy::Stopped)
    }
}

impl PasswordSlot<'_> {
    /// A PHC-format hash of `password` with a fresh salt.
    pub async fn hash(self, password: String) -> Result<String, PasswordBusy> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.pool.submit(PasswordJob::Hash { password, reply })?;
        answer.await.ok().flatten().ok_or(PasswordBusy::Stopped)
    }

    /// Whether `password` matches `hash` (`None`: the decoy, always false,
    /// in the same time).
    pub async fn verify(
        self,
        password: String,
        hash: Option<String>,
    ) -> Result<bool, PasswordBusy> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.pool.submit(PasswordJob::Verify {
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
    use argon2::PasswordHasher;

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

    /// A token signed with `keys`' secret, with `header` and these claims.
    fn signed(keys: &TokenKeys, header: &Header, exp: i64, iss: &str) -> String {
        let claims = Claims {
            sub: Uuid::new_v4(),
            iss: iss.into(),
            iat: Utc::now().timestamp(),
            exp,
        };
        jsonwebtoken::encode(header, &claims, &keys.encoding).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The pre-keyed check of our own tokens and `jsonwebtoken` give the same
    /// verdict on every token, and tokens of another shape still verify.
    #[test]
    fn own_tokens_are_judged_as_jsonwebtoken_judges_them() {
        let keys = TokenKeys::new(&settings());
        let ours = Header::new(Algorithm::HS256);
        let now = Utc::now().timestamp();
        let general =
            |t: &str| jsonwebtoken::decode::<Claims>(t, &keys.decoding, &keys.validation).is_ok();
        let own = |t: &str| {
            keys.own
                .as_ref()
                .and_then(|o| o.verify(t, &keys.issuer, keys.leeway_secs()))
        };
        let fresh = signed(&keys, &ours, now + 60, "flashsale");
        let within_leeway = signed(&keys, &ours, now - 2, "flashsale");
        let expired = signed(&keys, &ours, now - 60, "flashsale");
        let foreign = signed(&keys, &ours, now + 60, "someone-else");
        let mut bad_signature = fresh.clone();
        bad_signature.replace_range(fresh.len() - 4.., "AAAA");
        let (head, rest) = fresh.split_once('.').unwrap_or_else(|| panic!("no header"));
        let (_, sig) = rest
            .split_once('.')
            .unwrap_or_else(|| panic!("no signature"));
        let other_payload = signed(&keys, &ours, now + 3600, "flashsale");
        let other_payload = other_payload.split('.').nth(1).unwrap_or_default();
        let swapped_payload = format!("{head}.{other_payload}.{sig}");
        for (token, valid) in [
            (&fresh, true),
            (&within_leeway, true),
            (&expired, false),
            (&foreign, false),
            (&bad_signature, false),
            (&swapped_payload, false),
        ] {
            let checked =
                own(token).unwrap_or_else(|| panic!("our header, checked by the pre-keyed path"));
            assert_eq!(checked.is_ok(), valid, "pre-keyed verdict on {token}");
            assert_eq!(general(token), valid, "jsonwebtoken verdict on {token}");
            assert_eq!(keys.verify_claims(token).is_ok(), valid);
        }
        // Another header (a key id) signed with our secret: not our shape,
        // so `jsonwebtoken` decides, and accepts it.
        let mut with_kid = Header::new(Algorithm::HS256);
        with_kid.kid = Some("k1".into());
        let other_shape = signed(&keys, &with_kid, now + 60, "flashsale");
        assert!(own(&other_shape).is_none());
        assert!(keys.verify_claims(&other_shape).is_ok());
        let other_expired = signed(&keys, &with_kid, now - 60, "flashsale");
        assert!(keys.verify_claims(&other_expired).is_err());
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
        let mut memory = HashMemory::default();
        let h = p
            .hash("correct horse", &mut memory)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(h.starts_with("$argon2id$v=19$m=64,t=1,p=1$"), "{h}");
        assert!(p.verify("correct horse", Some(&h), &mut memory));
        assert!(!p.verify("wrong horse", Some(&h), &mut memory));
        assert!(!p.verify("correct horse", None, &mut memory));
        // A hash made by the argon2 crate's own PHC path verifies too, and
        // one made at another cost (the memory grows to it).
        let other = Argon2::new(
            ArgonAlgorithm::Argon2id,
            Version::V0x13,
            Params::new(128, 2, 1, None).unwrap_or_else(|e| panic!("{e}")),
        )
        .hash_password(b"correct horse", &SaltString::generate(&mut OsRng))
        .unwrap_or_else(|e| panic!("{e}"))
        .to_string();
        assert!(p.verify("correct horse", Some(&other), &mut memory));
        assert!(!p.verify("correct horsf", Some(&other), &mut memory));
        assert!(!p.verify("correct horse", Some("not a hash"), &mut memory));
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
