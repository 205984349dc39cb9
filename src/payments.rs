//! Payments: the boundary between flashsale and whoever moves the money.
//!
//! A [`PaymentProvider`] is asked to charge an order when its owner pays.
//! The built-in `simulated` provider approves at once (development, tests,
//! benchmarks). The `webhook` provider stands for an asynchronous one: the
//! charge answers `Pending`, and the provider later calls
//! `POST /api/v1/payments/webhook`, signed with the shared secret
//! ([`WebhookVerifier`]), to say how it went.
//!
//! A real provider plugs in by implementing [`PaymentProvider`] (create the
//! payment intent in `charge`, give money back in `refund`) and, when it
//! confirms asynchronously, by calling the webhook with an event in
//! [`WebhookEvent`]'s shape. The stock actor decides whether the payment
//! still wins (the reservation may have expired or been cancelled in the
//! meantime); when it does not, the charge is refunded.

use chrono::Utc;
use futures_util::future::BoxFuture;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::config::{PaymentProviderKind, PaymentSettings};
use crate::domain::order::Order;

/// What a provider said about a charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentOutcome {
    /// The money is taken.
    Approved,
    /// The provider will say later, on the webhook.
    Pending,
}

#[derive(Debug, thiserror::Error)]
pub enum PaymentError {
    #[error("payment declined: {0}")]
    Declined(String),
    #[error("payment provider unavailable: {0}")]
    Unavailable(String),
}

pub trait PaymentProvider: Send + Sync {
    fn name(&self) -> &'static str;
    /// Charges `amount_cents` in `currency` for `order`.
    fn charge(
        &self,
        order: &Order,
        amount_cents: i64,
        currency: &str,
    ) -> BoxFuture<'static, Result<PaymentOutcome, PaymentError>>;
    /// Gives back a charge for an order that did not win (expired or
    /// cancelled before the payment was decided).
    fn refund(&self, order: &Order) -> BoxFuture<'static, Result<(), PaymentError>>;
}

/// Approves every charge at once and refunds without fuss.
pub struct Simulated;

impl PaymentProvider for Simulated {
    fn name(&self) -> &'static str {
        "simulated"
    }

    fn charge(
        &self,
        _: &Order,
        _: i64,
        _: &str,
    ) -> BoxFuture<'static, Result<PaymentOutcome, PaymentError>> {
        Box::pin(async { Ok(PaymentOutcome::Approved) })
    }

    fn refund(&self, order: &Order) -> BoxFuture<'static, Result<(), PaymentError>> {
        tracing::info!(order_id = %order.id, "simulated refund");
        Box::pin(async { Ok(()) })
    }
}

/// Leaves every charge pending; the outcome arrives on the webhook.
pub struct AwaitWebhook;

impl PaymentProvider for AwaitWebhook {
    fn name(&self) -> &'static str {
        "webhook"
    }

    fn charge(
        &self,
        _: &Order,
        _: i64,
        _: &str,
    ) -> BoxFuture<'static, Result<PaymentOutcome, PaymentError>> {
        Box::pin(async { Ok(PaymentOutcome::Pending) })
    }

    fn refund(&self, order: &Order) -> BoxFuture<'static, Result<(), PaymentError>> {
        // The provider learns of it from the webhook answer ("refund").
        tracing::info!(order_id = %order.id, "refund requested from the payment provider");
        Box::pin(async { Ok(()) })
    }
}

pub fn provider(settings: &PaymentSettings) -> Box<dyn PaymentProvider> {
    match settings.provider {
        PaymentProviderKind::Simulated => Box::new(Simulated),
        PaymentProviderKind::Webhook => Box::new(AwaitWebhook),
    }
}

/// The body of a webhook call.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookEvent {
    /// The provider's id for this event (deliveries of one event share it).
    pub event_id: String,
    pub order_id: Uuid,
    pub outcome: WebhookOutcome,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WebhookOutcome {
    Succeeded,
    Failed,
}

/// The signature header: `t=<unix seconds>,v1=<hex HMAC-SHA256 of "t.body">`.
pub const SIGNATURE_HEADER: &str = "flashsale-signature";

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    #[error("missing or malformed signature header")]
    Malformed,
    #[error("signature does not match")]
    BadSignature,
    #[error("timestamp outside the accepted window")]
    Stale,
}

pub struct WebhookVerifier {
    secret: SecretString,
    tolerance_secs: i64,
}

impl WebhookVerifier {
    pub fn new(settings: &PaymentSettings) -> Self {
        WebhookVerifier {
            secret: settings.webhook_secret.clone(),
            tolerance_secs: i64::try_from(settings.webhook_tolerance_secs).unwrap_or(i64::MAX),
        }
    }

    fn mac(&self, timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
        // HMAC takes a key of any length.
        let mut mac = match Hmac::<Sha256>::new_from_slice(self.secret.expose_secret().as_bytes()) {
            Ok(m) => m,
            Err(_) => unreachable_hmac(),
        };
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }

    /// The header value a provider sends for `body` at `timestamp`.
    pub fn sign(&self, timestamp: i64, body: &[u8]) -> String {
        let tag = self.mac(timestamp, body).finalize().into_bytes();
        format!("t={timestamp},v1={}", hex::encode(tag))
    }

    /// Checks the header against `body` (constant-time) and the clock.
    pub fn verify(&self, header: &str, body: &[u8]) -> Result<(), WebhookError> {
        let mut timestamp = None;
        let mut signature = None;
        for part in header.split(',') {
            match part.trim().split_once('=') {
                Some(("t", v)) => timestamp = v.parse::<i64>().ok(),
                Some(("v1", v)) => signature = hex::decode(v).ok(),
                _ => {}
            }
        }
        let (Some(t), Some(sig)) = (timestamp, signature) else {
            return Err(WebhookError::Malformed);
        };
        self.mac(t, body)
            .verify_slice(&sig)
            .map_err(|_| WebhookError::BadSignature)?;
        if (Utc::now().timestamp() - t).abs() > self.tolerance_secs {
            return Err(WebhookError::Stale);
        }
        Ok(())
    }
}

/// `Hmac::new_from_slice` only fails for fixed-size-key MACs; HMAC is not one.
#[cold]
fn unreachable_hmac() -> ! {
    panic!("HMAC-SHA256 accepts keys of any length")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verifier(tolerance: u64) -> WebhookVerifier {
        WebhookVerifier::new(&PaymentSettings {
            provider: PaymentProviderKind::Webhook,
            webhook_secret: SecretString::from("s3cret"),
            webhook_tolerance_secs: tolerance,
        })
    }

    #[test]
    fn signatures_verify_and_refuse_tampering_and_age() {
        let v = verifier(300);
        let now = Utc::now().timestamp();
        let body = br#"{"event_id":"e1"}"#;
        let header = v.sign(now, body);
        assert_eq!(v.verify(&header, body), Ok(()));
        assert_eq!(
            v.verify(&header, br#"{"event_id":"e2"}"#),
            Err(WebhookError::BadSignature)
        );
        assert_eq!(
            v.verify(&v.sign(now - 301, body), body),
            Err(WebhookError::Stale)
        );
        assert_eq!(v.verify("v1=00", body), Err(WebhookError::Malformed));
        assert_eq!(v.verify("", body), Err(WebhookError::Malformed));
        let other = WebhookVerifier {
            secret: SecretString::from("other"),
            tolerance_secs: 300,
        };
        assert_eq!(
            v.verify(&other.sign(now, body), body),
            Err(WebhookError::BadSignature)
        );
    }
}
