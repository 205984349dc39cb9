//! Domain types and rules, with no HTTP, actor or database in them.
//!
//! Handlers, actors and stores all speak these types; the rules here are unit
//! tested on their own, and the boundaries map their errors to the outside
//! world in one place each (see `http::error`).

use std::borrow::Cow;

pub mod containers;
pub mod order;
pub mod sale;
pub mod sale_book;
pub mod user;

/// A rule on a request's field was broken. `field` names it so the answer can.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    pub field: Cow<'static, str>,
    pub message: String,
}

impl ValidationError {
    pub fn new(field: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}
