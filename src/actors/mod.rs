//! The stock actors: one `StockActor` per sale, and the registry that finds
//! them.
//!
//! Actors are where concurrency is resolved: a stock actor handles one
//! message at a time, so every decision about a sale is sequential without a
//! lock. (The order writers, actors too, belong to `order_log`.)

pub mod registry;
pub mod stock;
