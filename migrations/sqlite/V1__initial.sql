-- Embedded mode: users, sales and orders in one SQLite file, which is also
-- the order log (a committed batch of orders is in `orders`).
-- Ids are 16-byte UUIDs; times are integer microseconds since the Unix
-- epoch (what PostgreSQL keeps, and what the order log's wire carries).

CREATE TABLE users (
    id            BLOB PRIMARY KEY,
    username      TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    created_us    INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE sales (
    id                   BLOB PRIMARY KEY,
    name                 TEXT NOT NULL,
    description          TEXT NOT NULL DEFAULT '',
    price_cents          INTEGER NOT NULL CHECK (price_cents >= 0),
    currency             TEXT NOT NULL CHECK (length(currency) = 3),
    stock_total          INTEGER NOT NULL CHECK (stock_total > 0),
    per_user_limit       INTEGER NOT NULL CHECK (per_user_limit > 0),
    starts_us            INTEGER NOT NULL,
    ends_us              INTEGER NOT NULL,
    reservation_ttl_secs INTEGER NOT NULL CHECK (reservation_ttl_secs > 0),
    paused               INTEGER NOT NULL DEFAULT 0,
    created_us           INTEGER NOT NULL,
    updated_us           INTEGER NOT NULL,
    CHECK (ends_us > starts_us)
) WITHOUT ROWID;

-- As in PostgreSQL: no foreign key to users (load tests mint tokens for
-- users never registered) nor to sales (the order log names only sales the
-- stock actors hold). 'void' marks a reservation that was in doubt and was
-- released: its row stops a late copy from being inserted.
-- UUIDv7 ids grow with time, so new orders append to the primary key.
CREATE TABLE orders (
    id              BLOB PRIMARY KEY,
    sale_id         BLOB NOT NULL,
    user_id         BLOB NOT NULL,
    quantity        INTEGER NOT NULL CHECK (quantity > 0),
    status          TEXT NOT NULL CHECK (status IN ('reserved', 'paid', 'cancelled', 'expired', 'void')),
    idempotency_key TEXT,
    created_us      INTEGER NOT NULL,
    expires_us      INTEGER NOT NULL,
    paid_us         INTEGER,
    closed_us       INTEGER,
    price_cents     INTEGER,
    currency        TEXT
) WITHOUT ROWID;

CREATE INDEX orders_by_user ON orders (user_id, created_us DESC);
CREATE UNIQUE INDEX orders_idempotency_key
    ON orders (sale_id, user_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- Payment webhook events already handled (see the PostgreSQL migration V4).
CREATE TABLE payment_events (
    event_id    TEXT PRIMARY KEY,
    order_id    BLOB NOT NULL,
    result      TEXT,
    received_us INTEGER NOT NULL
) WITHOUT ROWID;
