//! The actors: one `StockActor` per sale, and the `OrderWriter` pool.
//!
//! Actors are where concurrency is resolved: a stock actor handles one
//! message at a time, so every decision about a sale is sequential without a
//! lock; the writers each own a channel and a connection, so nothing is shared.

pub mod order_writer;
pub mod registry;
pub mod stock;
