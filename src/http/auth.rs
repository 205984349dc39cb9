//! Extractors that say who is calling: a shopper (bearer JWT) or an admin
//! (the configured admin token). Handlers that take one cannot run without it.

use std::cell::RefCell;

use actix_web::dev::Payload;
use actix_web::http::header;
use actix_web::{web, FromRequest, HttpRequest};
use futures_util::future::{ready, Ready};
use uuid::Uuid;

use super::error::ApiError;
use super::AppState;

pub(crate) fn bearer(req: &HttpRequest) -> Option<&str> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

fn state(req: &HttpRequest) -> Result<&web::Data<AppState>, ApiError> {
    req.app_data::<web::Data<AppState>>()
        .ok_or_else(|| ApiError::internal(anyhow::anyhow!("application state missing")))
}

/// A shopper whose bearer token verified.
#[derive(Debug, Clone, Copy)]
pub struct Shopper {
    pub user_id: Uuid,
}

impl FromRequest for Shopper {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready((|| {
            let state = state(req)?;
            let token = bearer(req).ok_or(ApiError::Unauthenticated)?;
            let cache = req.app_data::<TokenCache>();
            let now = chrono::Utc::now().timestamp();
            let leeway = state.tokens.leeway_secs();
            if let Some(user_id) = cache.and_then(|c| c.get(token, now, leeway)) {
                return Ok(Shopper { user_id });
            }
            match state.tokens.verify_claims(token) {
                Ok(claims) => {
                    if let Some(c) = cache {
                        c.insert(token, claims.sub, claims.exp);
                    }
                    Ok(Shopper {
                        user_id: claims.sub,
                    })
                }
                Err(e) => {
                    tracing::debug!(error = %e, "token refused");
                    Err(ApiError::Unauthenticated)
                }
            }
        })())
    }
}

/// Shopper tokens this HTTP worker has verified: token -> (user, `exp`).
///
/// One per worker (built in the `App` factory), so it needs no lock. The key
/// is the whole token, so a hit stands for exactly the bytes that were
/// verified (signature, issuer and all); only expiry changes with time, and
/// it is checked on every hit with the same leeway as verification. Bounded
/// by `auth.token_cache_per_worker`, evicting with quick_cache's
/// scan-resistant policy, so a crowd of one-time buyers does not push out
/// the ones pressing "buy" again.
///
/// A token is remembered when it is verified for the second time, not the
/// first: a rush is mostly buyers who ask once, and putting each of their
/// tokens in the cache (a copy of the token, an eviction) was 3.6% of the
/// server's CPU per durable reservation, for entries never read again. A
/// doorkeeper of one hash per slot (as many slots as the cache holds
/// tokens) notes each first sighting.
pub struct TokenCache(Option<TokenCacheInner>);

struct TokenCacheInner {
    tokens: RefCell<VerifiedTokens>,
    /// The hash of the last token first verified in each slot.
    seen_once: RefCell<Box<[u64]>>,
    hasher: foldhash::quality::RandomState,
}

/// Token -> (user id, `exp` in seconds). Hashed with a randomly seeded
/// foldhash: SipHash over a 200-byte token was most of the cost of a miss,
/// and only tokens that verified are ever inserted, so nobody picks the keys.
type VerifiedTokens = quick_cache::unsync::Cache<
    Box<str>,
    (Uuid, i64),
    quick_cache::UnitWeighter,
    foldhash::quality::RandomState,
    quick_cache::unsync::DefaultLifecycle<Box<str>, (Uuid, i64)>,
>;

impl TokenCache {
    /// A cache of `capacity` tokens; 0 remembers none.
    pub fn new(capacity: usize) -> Self {
        TokenCache((capacity > 0).then(|| TokenCacheInner {
            tokens: RefCell::new(quick_cache::unsync::Cache::with(
                capacity,
                capacity as u64,
                quick_cache::UnitWeighter,
                foldhash::quality::RandomState::default(),
                quick_cache::unsync::DefaultLifecycle::default(),
            )),
            seen_once: RefCell::new(vec![0; capacity].into_boxed_slice()),
            hasher: foldhash::quality::RandomState::default(),
        }))
    }

    /// The user of a remembered token that has not expired at `now`
    /// (seconds), allowing `leeway` seconds past `exp`.
    pub fn get(&self, token: &str, now: i64, leeway: i64) -> Option<Uuid> {
        let inner = self.0.as_ref()?;
        let (user, exp) = *inner.tokens.borrow().get(token)?;
        if exp >= now.saturating_sub(leeway) {
            return Some(user);
        }
        inner.tokens.borrow_mut().remove(token);
        None
    }

    /// Notes a token that has just been verified; remembers it when it was
    /// verified before (see the type's docs).
    pub fn insert(&self, token: &str, user: Uuid, exp: i64) {
        let Some(inner) = &self.0 else {
            return;
        };
        let hash = std::hash::BuildHasher::hash_one(&inner.hasher, token) | 1;
        let mut seen = inner.seen_once.borrow_mut();
        let slot = hash as usize % seen.len();
        if seen[slot] == hash {
            seen[slot] = 0;
            inner.tokens.borrow_mut().insert(token.into(), (user, exp));
        } else {
            seen[slot] = hash;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_verified_tokens_until_they_expire() {
        let cache = TokenCache::new(8);
        let user = Uuid::new_v4();
        assert_eq!(cache.get("a.b.c", 1_000, 5), None, "nothing before insert");
        cache.insert("a.b.c", user, 1_000);
        assert_eq!(
            cache.get("a.b.c", 1_000, 5),
            None,
            "a token verified once is not remembered yet"
        );
        cache.insert("a.b.c", user, 1_000);
        assert_eq!(cache.get("a.b.c", 1_000, 5), Some(user));
        assert_eq!(
            cache.get("a.b.c", 1_005, 5),
            Some(user),
            "within the leeway"
        );
        assert_eq!(
            cache.get("a.b.x", 1_000, 5),
            None,
            "another token is not a hit"
        );
        assert_eq!(cache.get("a.b.c", 1_006, 5), None, "expired");
        assert_eq!(
            cache.get("a.b.c", 1_000, 5),
            None,
            "an expired entry is dropped"
        );
    }

    #[test]
    fn a_zero_capacity_remembers_nothing() {
        let cache = TokenCache::new(0);
        for _ in 0..3 {
            cache.insert("a.b.c", Uuid::new_v4(), i64::MAX);
        }
        assert_eq!(cache.get("a.b.c", 0, 0), None);
    }

    #[test]
    fn stays_within_its_capacity() {
        let cache = TokenCache::new(100);
        for i in 0..10_000 {
            for _ in 0..2 {
                cache.insert(&format!("token-{i}"), Uuid::new_v4(), i64::MAX);
            }
        }
        let held = (0..10_000)
            .filter(|i| cache.get(&format!("token-{i}"), 0, 0).is_some())
            .count();
        assert!(held > 0 && held <= 110, "{held} tokens held");
    }

    #[test]
    fn a_crowd_of_one_time_tokens_is_not_remembered() {
        let cache = TokenCache::new(100);
        let again = Uuid::new_v4();
        cache.insert("again", again, i64::MAX);
        cache.insert("again", again, i64::MAX);
        for i in 0..10_000 {
            cache.insert(&format!("once-{i}"), Uuid::new_v4(), i64::MAX);
        }
        let held = (0..10_000)
            .filter(|i| cache.get(&format!("once-{i}"), 0, 0).is_some())
            .count();
        assert_eq!(held, 0, "tokens verified once are not remembered");
        assert_eq!(cache.get("again", 0, 0), Some(again));
    }
}

/// A caller that presented the admin token.
#[derive(Debug, Clone, Copy)]
pub struct Admin;

impl FromRequest for Admin {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready((|| {
            let state = state(req)?;
            let token = bearer(req).ok_or(ApiError::Unauthenticated)?;
            if state.admin_token.matches(token) {
                Ok(Admin)
            } else {
                Err(ApiError::Unauthenticated)
            }
        })())
    }
}
