//! Rate limits: per client IP on every route, per user on purchases.
//!
//! Both are GCRA limiters from `governor`, keyed in a `DashMap`. Keys whose
//! state has decayed back to "never seen" are forgotten every
//! `limits.evict_interval_secs` (`evict_idle`), so memory follows the
//! clients of the last minute, not every client ever. Measured on this
//! machine (a million keys inserted, resident memory before and after): a
//! million live keys cost about 66 MiB as IP addresses and 51 MiB as user ids.
//!
//! The client IP is the socket's peer, unless the peer is a configured
//! trusted proxy: then the rightmost address of `X-Forwarded-For` that is not
//! itself a trusted proxy.

use std::net::IpAddr;
use std::num::NonZeroU32;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use uuid::Uuid;

use crate::config::LimitSettings;

pub struct RateLimits {
    per_ip: Option<DefaultKeyedRateLimiter<IpAddr>>,
    per_user: Option<DefaultKeyedRateLimiter<Uuid>>,
    /// Password work (logins, sign-ups) per client IP.
    logins_per_ip: Option<DefaultKeyedRateLimiter<IpAddr>>,
    /// Logins per username, from anywhere.
    logins_per_username: Option<DefaultKeyedRateLimiter<String>>,
    trusted_proxies: Vec<IpAddr>,
    clock: DefaultClock,
}

fn quota(per_second: u32, burst: u32) -> Option<Quota> {
    let rate = NonZeroU32::new(per_second)?;
    let burst = NonZeroU32::new(burst.max(1))?;
    Some(Quota::per_second(rate).allow_burst(burst))
}

/// `per_minute` spread over the minute, all of it available at once.
fn quota_per_minute(per_minute: u32) -> Option<Quota> {
    let rate = NonZeroU32::new(per_minute)?;
    Some(Quota::per_minute(rate).allow_burst(rate))
}

impl RateLimits {
    pub fn new(settings: &LimitSettings) -> Result<Self, String> {
        let trusted_proxies = settings
            .trusted_proxies
            .iter()
            .map(|s| {
                s.parse::<IpAddr>()
                    .map_err(|e| format!("limits.trusted_proxies: {s:?}: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RateLimits {
            per_ip: quota(settings.per_ip_per_second, settings.per_ip_burst)
                .map(RateLimiter::dashmap),
            per_user: quota(
                settings.purchases_per_user_per_second,
                settings.purchases_per_user_burst,
            )
            .map(RateLimiter::dashmap),
            logins_per_ip: quota_per_minute(settings.logins_per_ip_per_minute)
                .map(RateLimiter::dashmap),
            logins_per_username: quota_per_minute(settings.logins_per_username_per_minute)
                .map(RateLimiter::dashmap),
            trusted_proxies,
            clock: DefaultClock::default(),
        })
    }

    /// `Err(seconds to wait)` when `ip` is over its quota.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), u32> {
        match &self.per_ip {
            Some(l) => l.check_key(&ip).map_err(|n| self.retry_after(&n)),
            None => Ok(()),
        }
    }

    /// `Err(seconds to wait)` when `user` is over its purchase quota.
    pub fn check_user(&self, user: Uuid) -> Result<(), u32> {
        match &self.per_user {
            Some(l) => l.check_key(&user).map_err(|n| self.retry_after(&n)),
            None => Ok(()),
        }
    }

    /// `Err(seconds to wait)` when a login or sign-up from `ip` for
    /// `username` is over a quota. The username is counted only for logins.
    pub fn check_login(&self, ip: Option<IpAddr>, username: Option<&str>) -> Result<(), u32> {
        if let (Some(l), Some(ip)) = (&self.logins_per_ip, ip) {
            l.check_key(&ip).map_err(|n| self.retry_after(&n))?;
        }
        if let (Some(l), Some(name)) = (&self.logins_per_username, username) {
            l.check_key(&name.to_owned())
                .map_err(|n| self.retry_after(&n))?;
        }
        Ok(())
    }

    fn retry_after(&self, not_until: &governor::NotUntil<governor::clock::QuantaInstant>) -> u32 {
        let wait = not_until.wait_time_from(self.clock.now());
        // Whole seconds, rounded up: Retry-After never says "now" too early.
        u32::try_from(wait.as_secs() + u64::from(wait.subsec_nanos() > 0))
            .unwrap_or(u32::MAX)
            .max(1)
    }

    /// The client's address: the peer, or for a trusted proxy the rightmost
    /// `X-Forwarded-For` entry that is not a trusted proxy. `forwarded_for`
    /// gives the header's lines in order (several lines are one list, as
    /// RFC 9110 says); it is read only for a trusted peer.
    pub fn client_ip<'a>(
        &self,
        peer: Option<IpAddr>,
        forwarded_for: impl FnOnce() -> Vec<&'a str>,
    ) -> Option<IpAddr> {
        let peer = peer?;
        if !self.trusted_proxies.contains(&peer) {
            return Some(peer);
        }
        forwarded_for()
            .iter()
            .rev()
            .flat_map(|line| line.rsplit(','))
            .filter_map(|a| a.trim().parse::<IpAddr>().ok())
            .find(|a| !self.trusted_proxies.contains(a))
            .or(Some(peer))
    }

    /// Forgets keys back at a full bucket; returns the keys still tracked.
    pub fn evict_idle(&self) -> (usize, usize) {
        let ip = self.per_ip.as_ref().map_or(0, |l| {
            l.retain_recent();
            l.shrink_to_fit();
            l.len()
        });
        let user = self.per_user.as_ref().map_or(0, |l| {
            l.retain_recent();
            l.shrink_to_fit();
            l.len()
        });
        if let Some(l) = &self.logins_per_ip {
            l.retain_recent();
            l.shrink_to_fit();
        }
        if let Some(l) = &self.logins_per_username {
            l.retain_recent();
            l.shrink_to_fit();
        }
        (ip, user)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_ip: u32, trusted: &[&str]) -> RateLimits {
        RateLimits::new(&LimitSettings {
            per_ip_per_second: per_ip,
            per_ip_burst: per_ip,
            purchases_per_user_per_second: 1,
            purchases_per_user_burst: 2,
            trusted_proxies: trusted.iter().map(|s| s.to_string()).collect(),
            evict_interval_secs: 60,
            logins_per_ip_per_minute: 3,
            logins_per_username_per_minute: 2,
        })
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn quotas_hold_per_key() {
        let l = limits(3, &[]);
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        for _ in 0..3 {
            assert_eq!(l.check_ip(a), Ok(()));
        }
        assert!(matches!(l.check_ip(a), Err(s) if s >= 1));
        assert_eq!(l.check_ip(b), Ok(()));
        let u = Uuid::new_v4();
        assert_eq!(l.check_user(u), Ok(()));
        assert_eq!(l.check_user(u), Ok(()));
        assert!(l.check_user(u).is_err());
        assert_eq!(l.check_user(Uuid::new_v4()), Ok(()));
    }

    #[test]
    fn logins_are_limited_per_ip_and_per_username() {
        let l = limits(0, &[]);
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        assert_eq!(l.check_login(Some(a), Some("alice")), Ok(()));
        assert_eq!(l.check_login(Some(b), Some("alice")), Ok(()));
        // A third try on one name, from a third address: refused.
        assert!(l
            .check_login(Some([10, 0, 0, 3].into()), Some("alice"))
            .is_err());
        // Sign-ups count per address only.
        assert_eq!(l.check_login(Some(a), None), Ok(()));
        assert_eq!(l.check_login(Some(a), Some("carol")), Ok(()));
        assert!(
            l.check_login(Some(a), Some("bob")).is_err(),
            "fourth from one address"
        );
        assert_eq!(l.check_login(Some(b), Some("bob")), Ok(()));
    }

    #[test]
    fn zero_turns_a_limit_off() {
        let l = limits(0, &[]);
        for _ in 0..1000 {
            assert_eq!(l.check_ip([10, 0, 0, 1].into()), Ok(()));
        }
    }

    #[test]
    fn forwarded_for_is_honoured_only_from_trusted_proxies() {
        let l = limits(1, &["10.0.0.9"]);
        let proxy: IpAddr = [10, 0, 0, 9].into();
        let other: IpAddr = [10, 0, 0, 8].into();
        let lines = |v: &'static [&'static str]| move || v.to_vec();
        assert_eq!(
            l.client_ip(Some(proxy), lines(&["198.51.100.1, 203.0.113.5"])),
            Some([203, 0, 113, 5].into())
        );
        // The proxy's own entries are skipped.
        assert_eq!(
            l.client_ip(Some(proxy), lines(&["203.0.113.5, 10.0.0.9"])),
            Some([203, 0, 113, 5].into())
        );
        // Several header lines are one list: the last line's entries count first.
        assert_eq!(
            l.client_ip(
                Some(proxy),
                lines(&["198.51.100.1", "203.0.113.7, 10.0.0.9"])
            ),
            Some([203, 0, 113, 7].into())
        );
        assert_eq!(
            l.client_ip(Some(proxy), lines(&["198.51.100.1", "10.0.0.9"])),
            Some([198, 51, 100, 1].into())
        );
        assert_eq!(l.client_ip(Some(proxy), lines(&["garbage"])), Some(proxy));
        assert_eq!(
            l.client_ip(Some(other), lines(&["203.0.113.5"])),
            Some(other)
        );
        assert_eq!(l.client_ip(Some(proxy), lines(&[])), Some(proxy));
    }

    #[test]
    fn idle_keys_are_evicted() {
        let l = limits(1000, &[]);
        for i in 0..100u8 {
            let _ = l.check_ip([10, 0, 1, i].into());
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
        let (ips, _) = l.evict_idle();
        assert_eq!(ips, 0, "keys back at a full bucket are forgotten");
    }
}
