//! Sales: the editable definition of a sale, its validation, and the status
//! derived from time, pause state and stock.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::ValidationError;

/// Sale windows lie between 2000-01-01 and 9999-12-31 (Unix seconds):
/// far wider than any sale, and inside what PostgreSQL and clients store.
const EARLIEST: i64 = 946_684_800;
const LATEST: i64 = 253_402_300_799;
pub const MAX_STOCK: i64 = 10_000_000;
pub const MAX_NAME_CHARS: usize = 200;
pub const MAX_DESCRIPTION_CHARS: usize = 4_000;
/// Prices up to ten billion major units; far beyond any real sale, well within i64.
pub const MAX_PRICE_CENTS: i64 = 1_000_000_000_000;
/// A reservation may hold its units for at most a day.
pub const MAX_RESERVATION_TTL_SECS: i64 = 86_400;

/// What an admin defines about a sale. Stored as is; everything else about a
/// sale (its status, its stock left) is derived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaleSpec {
    pub name: String,
    pub description: String,
    pub price_cents: i64,
    pub currency: String,
    pub stock_total: i64,
    pub per_user_limit: i64,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
    pub reservation_ttl_secs: i64,
}

/// A stored sale.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sale {
    pub id: Uuid,
    pub spec: SaleSpec,
    pub paused: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Where a sale stands, as shoppers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SaleStatus {
    Scheduled,
    Live,
    Paused,
    SoldOut,
    Ended,
}

impl SaleStatus {
    /// Derives the status. An ended sale is ended whatever else holds; a paused
    /// one is paused even before it starts (the admin said so); a sale that is
    /// running and has nothing left is sold out (units may come back when a
    /// reservation expires or is cancelled, and then it is live again).
    pub fn derive(
        now: DateTime<Utc>,
        starts_at: DateTime<Utc>,
        ends_at: DateTime<Utc>,
        paused: bool,
        stock_left: i64,
    ) -> Self {
        if now >= ends_at {
            SaleStatus::Ended
        } else if paused {
            SaleStatus::Paused
        } else if now < starts_at {
            SaleStatus::Scheduled
        } else if stock_left <= 0 {
            SaleStatus::SoldOut
        } else {
            SaleStatus::Live
        }
    }
}

/// Three capital ASCII letters, the shape of an ISO 4217 code.
pub fn is_currency_code(code: &str) -> bool {
    code.len() == 3 && code.bytes().all(|b| b.is_ascii_uppercase())
}

impl SaleSpec {
    /// Checks every field; the error names the first field that is wrong.
    pub fn validate(&self) -> Result<(), ValidationError> {
        let name_chars = self.name.chars().count();
        if self.name.trim().is_empty() || name_chars > MAX_NAME_CHARS {
            return Err(ValidationError::new(
                "name",
                format!("must be 1 to {MAX_NAME_CHARS} characters and not blank"),
            ));
        }
        if self.name.chars().any(char::is_control) {
            return Err(ValidationError::new(
                "name",
                "must not hold control characters",
            ));
        }
        if self.description.chars().count() > MAX_DESCRIPTION_CHARS {
            return Err(ValidationError::new(
                "description",
                format!("must be at most {MAX_DESCRIPTION_CHARS} characters"),
            ));
        }
        // Line breaks and tabs are text; other control characters (NUL
        // above all, which PostgreSQL cannot store) are not.
        if self
            .description
            .chars()
            .any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
        {
            return Err(ValidationError::new(
                "description",
                "must not hold control characters other than line breaks and tabs",
            ));
        }
        if !(0..=MAX_PRICE_CENTS).contains(&self.price_cents) {
            return Err(ValidationError::new(
                "price_cents",
                format!("must be from 0 to {MAX_PRICE_CENTS}"),
            ));
        }
        if !is_currency_code(&self.currency) {
            return Err(ValidationError::new(
                "currency",
                "must be an ISO 4217 code: three capital letters",
            ));
        }
        if !(1..=MAX_STOCK).contains(&self.stock_total) {
            return Err(ValidationError::new(
                "stock_total",
                format!("must be from 1 to {MAX_STOCK}"),
            ));
        }
        if !(1..=self.stock_total).contains(&self.per_user_limit) {
            return Err(ValidationError::new(
                "per_user_limit",
                "must be from 1 to stock_total",
            ));
        }
        for (field, at) in [("starts_at", self.starts_at), ("ends_at", self.ends_at)] {
            if !(EARLIEST..=LATEST).contains(&at.timestamp()) {
                return Err(ValidationError::new(
                    field,
                    "must be between 2000-01-01 and 9999-12-31 (UTC)",
                ));
            }
        }
        if self.ends_at <= self.starts_at {
            return Err(ValidationError::new("ends_at", "must be after starts_at"));
        }
        if !(1..=MAX_RESERVATION_TTL_SECS).contains(&self.reservation_ttl_secs) {
            return Err(ValidationError::new(
                "reservation_ttl_secs",
                format!("must be from 1 to {MAX_RESERVATION_TTL_SECS}"),
            ));
        }
        Ok(())
    }
}

/// A patch was refused: either a field is invalid or the change is not allowed now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatchError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error(transparent)]
    Transition(#[from] TransitionError),
}

/// Why an admin's change to a sale was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    #[error("the sale has ended and can no longer change")]
    Ended,
    #[error("the sale has started; its start time can no longer change")]
    AlreadyStarted,
    #[error("stock_total {requested} is below the {held} units already reserved or paid")]
    BelowHeld { requested: i64, held: i64 },
}

/// Changes an admin may request; `None` keeps the current value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SalePatch {
    pub name: Option<String>,
    pub description: Option<String>,
    pub price_cents: Option<i64>,
    pub currency: Option<String>,
    pub stock_total: Option<i64>,
    pub per_user_limit: Option<i64>,
    pub starts_at: Option<DateTime<Utc>>,
    pub ends_at: Option<DateTime<Utc>>,
    pub reservation_ttl_secs: Option<i64>,
}

impl Sale {
    /// The spec after `patch`, checked against the rules of a sale that may
    /// already be running: an ended sale is frozen, a started one keeps its
    /// start, and stock never drops below what orders already hold.
    pub fn patched(
        &self,
        patch: &SalePatch,
        now: DateTime<Utc>,
        units_held: i64,
    ) -> Result<SaleSpec, PatchError> {
        let cur = &self.spec;
        let next = SaleSpec {
            name: patch.name.clone().unwrap_or_else(|| cur.name.clone()),
            description: patch
                .description
                .clone()
                .unwrap_or_else(|| cur.description.clone()),
            price_cents: patch.price_cents.unwrap_or(cur.price_cents),
            currency: patch
                .currency
                .clone()
                .unwrap_or_else(|| cur.currency.clone()),
            stock_total: patch.stock_total.unwrap_or(cur.stock_total),
            per_user_limit: patch.per_user_limit.unwrap_or(cur.per_user_limit),
            starts_at: patch.starts_at.unwrap_or(cur.starts_at),
            ends_at: patch.ends_at.unwrap_or(cur.ends_at),
            reservation_ttl_secs: patch
                .reservation_ttl_secs
                .unwrap_or(cur.reservation_ttl_secs),
        };
        next.validate()?;
        if now >= cur.ends_at {
            return Err(TransitionError::Ended.into());
        }
        if now >= cur.starts_at && next.starts_at != cur.starts_at {
            return Err(TransitionError::AlreadyStarted.into());
        }
        if next.stock_total < units_held {
            return Err(TransitionError::BelowHeld {
                requested: next.stock_total,
                held: units_held,
            }
            .into());
        }
        Ok(next)
    }

    /// Pausing or resuming is refused only once the sale has ended; asking
    /// for the state a sale is already in is harmless.
    pub fn ensure_not_ended(&self, now: DateTime<Utc>) -> Result<(), TransitionError> {
        if now >= self.spec.ends_at {
            return Err(TransitionError::Ended);
        }
        Ok(())
    }

    pub fn status(&self, now: DateTime<Utc>, stock_left: i64) -> SaleStatus {
        SaleStatus::derive(
            now,
            self.spec.starts_at,
            self.spec.ends_at,
            self.paused,
            stock_left,
        )
    }
}

/// A sale as shoppers see it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SaleView {
    pub id: Uuid,
    pub name: String,
    pub description: String,
    pub price_cents: i64,
    pub currency: String,
    pub stock_total: i64,
    pub stock_left: i64,
    pub per_user_limit: i64,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
    pub reservation_ttl_secs: i64,
    pub status: SaleStatus,
}

impl SaleView {
    pub fn new(sale: &Sale, stock_left: i64, now: DateTime<Utc>) -> Self {
        let s = &sale.spec;
        SaleView {
            id: sale.id,
            name: s.name.clone(),
            description: s.description.clone(),
            price_cents: s.price_cents,
            currency: s.currency.clone(),
            stock_total: s.stock_total,
            stock_left,
            per_user_limit: s.per_user_limit,
            starts_at: s.starts_at,
            ends_at: s.ends_at,
            reservation_ttl_secs: s.reservation_ttl_secs,
            status: sale.status(now, stock_left),
        }
    }
}

/// A valid spec for tests: 100 units at 99.00 EUR, one per buyer, on sale
/// from now for an hour.
#[cfg(test)]
impl SaleSpec {
    pub(crate) fn example() -> Self {
        let now = Utc::now();
        SaleSpec {
            name: "Phones".into(),
            description: String::new(),
            price_cents: 9_900,
            currency: "EUR".into(),
            stock_total: 100,
            per_user_limit: 1,
            starts_at: now,
            ends_at: now + chrono::Duration::hours(1),
            reservation_ttl_secs: 600,
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::Duration;

    use super::*;

    fn spec() -> SaleSpec {
        SaleSpec::example()
    }

    fn field_of(spec: &SaleSpec) -> Option<String> {
        spec.validate().err().map(|e| e.field.into_owned())
    }

    #[test]
    fn a_good_spec_passes() {
        assert_eq!(field_of(&spec()), None);
    }

    #[test]
    fn each_rule_names_its_field() {
        type Mutation = Box<dyn Fn(&mut SaleSpec)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("name", Box::new(|s| s.name = String::new())),
            ("name", Box::new(|s| s.name = "   ".into())),
            ("name", Box::new(|s| s.name = "x".repeat(201))),
            ("name", Box::new(|s| s.name = "a\u{0}b".into())),
            (
                "description",
                Box::new(|s| s.description = "d".repeat(4001)),
            ),
            ("price_cents", Box::new(|s| s.price_cents = -1)),
            (
                "price_cents",
                Box::new(|s| s.price_cents = MAX_PRICE_CENTS + 1),
            ),
            ("currency", Box::new(|s| s.currency = "eur".into())),
            ("currency", Box::new(|s| s.currency = "EURO".into())),
            ("stock_total", Box::new(|s| s.stock_total = 0)),
            ("stock_total", Box::new(|s| s.stock_total = MAX_STOCK + 1)),
            ("per_user_limit", Box::new(|s| s.per_user_limit = 0)),
            ("per_user_limit", Box::new(|s| s.per_user_limit = 101)),
            ("ends_at", Box::new(|s| s.ends_at = s.starts_at)),
            (
                "reservation_ttl_secs",
                Box::new(|s| s.reservation_ttl_secs = 0),
            ),
            (
                "reservation_ttl_secs",
                Box::new(|s| s.reservation_ttl_secs = MAX_RESERVATION_TTL_SECS + 1),
            ),
        ];
        for (field, mutate) in cases {
            let mut s = spec();
            mutate(&mut s);
            assert_eq!(field_of(&s).as_deref(), Some(field), "{s:?}");
        }
        let mut edge = spec();
        edge.name = "x".repeat(200);
        edge.price_cents = 0;
        edge.stock_total = MAX_STOCK;
        edge.per_user_limit = MAX_STOCK;
        assert_eq!(field_of(&edge), None);
    }

    fn stored(spec: SaleSpec) -> Sale {
        Sale {
            id: Uuid::new_v4(),
            spec,
            paused: false,
            created_at: Utc::now(),
            updated_at: Utc::now(),
        }
    }

    #[test]
    fn patches_follow_the_transition_rules() {
        let now = Utc::now();
        let mut running = spec();
        running.starts_at = now - Duration::minutes(5);
        let sale = stored(running.clone());
        let rename = SalePatch {
            name: Some("New".into()),
            ..SalePatch::default()
        };
        assert_eq!(
            sale.patched(&rename, now, 0).map(|s| s.name),
            Ok("New".into())
        );
        let restart = SalePatch {
            starts_at: Some(now + Duration::minutes(1)),
            ..SalePatch::default()
        };
        assert_eq!(
            sale.patched(&restart, now, 0),
            Err(TransitionError::AlreadyStarted.into())
        );
        let shrink = SalePatch {
            stock_total: Some(10),
            ..SalePatch::default()
        };
        assert_eq!(
            sale.patched(&shrink, now, 11),
            Err(TransitionError::BelowHeld {
                requested: 10,
                held: 11
            }
            .into())
        );
        assert!(sale.patched(&shrink, now, 10).is_ok());
        let bad = SalePatch {
            currency: Some("usd".into()),
            ..SalePatch::default()
        };
        assert!(matches!(
            sale.patched(&bad, now, 0),
            Err(PatchError::Invalid(_))
        ));
        let later = running.ends_at + Duration::seconds(1);
        assert_eq!(
            sale.patched(&rename, later, 0),
            Err(TransitionError::Ended.into())
        );
        assert_eq!(sale.ensure_not_ended(later), Err(TransitionError::Ended));
        assert_eq!(sale.ensure_not_ended(now), Ok(()));
        // A scheduled sale may move its start.
        let mut scheduled = spec();
        scheduled.starts_at = now + Duration::minutes(5);
        let sale = stored(scheduled);
        assert!(sale.patched(&restart, now, 0).is_ok());
    }

    #[test]
    fn status_is_derived_in_order() {
        let now = Utc::now();
        let start = now - Duration::minutes(1);
        let end = now + Duration::minutes(1);
        use SaleStatus::*;
        assert_eq!(SaleStatus::derive(now, start, end, false, 5), Live);
        assert_eq!(SaleStatus::derive(now, start, end, false, 0), SoldOut);
        assert_eq!(SaleStatus::derive(now, start, end, true, 5), Paused);
        assert_eq!(SaleStatus::derive(now, start, end, true, 0), Paused);
        let later = now + Duration::seconds(30);
        assert_eq!(SaleStatus::derive(now, later, end, false, 5), Scheduled);
        assert_eq!(SaleStatus::derive(now, later, end, true, 5), Paused);
        assert_eq!(SaleStatus::derive(end, start, end, true, 0), Ended);
        assert_eq!(SaleStatus::derive(end, start, end, false, 5), Ended);
    }
}
