-- Users, sales and orders: PostgreSQL is the source of truth for all three.

CREATE TABLE users (
    id            UUID PRIMARY KEY,
    username      TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE sales (
    id                   UUID PRIMARY KEY,
    name                 TEXT NOT NULL,
    description          TEXT NOT NULL DEFAULT '',
    price_cents          BIGINT NOT NULL CHECK (price_cents >= 0),
    currency             TEXT NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    stock_total          INTEGER NOT NULL CHECK (stock_total > 0),
    per_user_limit       INTEGER NOT NULL CHECK (per_user_limit > 0),
    starts_at            TIMESTAMPTZ NOT NULL,
    ends_at              TIMESTAMPTZ NOT NULL,
    reservation_ttl_secs INTEGER NOT NULL CHECK (reservation_ttl_secs > 0),
    paused               BOOLEAN NOT NULL DEFAULT false,
    created_at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK (ends_at > starts_at)
);

-- Orders are written by the order writers from the order log. There is no
-- foreign key to users: load tests mint tokens for users that were never
-- registered, and an order must never be refused for that.
-- status 'void' marks a reservation that was in doubt (its publish was never
-- confirmed) and was released: the row exists so that a late copy of the
-- reservation cannot be inserted after the decision (ON CONFLICT DO NOTHING).
CREATE TABLE orders (
    id              UUID PRIMARY KEY,
    sale_id         UUID NOT NULL REFERENCES sales (id),
    user_id         UUID NOT NULL,
    quantity        INTEGER NOT NULL CHECK (quantity > 0),
    status          TEXT NOT NULL CHECK (status IN ('reserved', 'paid', 'cancelled', 'expired', 'void')),
    idempotency_key TEXT,
    created_at      TIMESTAMPTZ NOT NULL,
    expires_at      TIMESTAMPTZ NOT NULL,
    paid_at         TIMESTAMPTZ,
    closed_at       TIMESTAMPTZ
);

CREATE INDEX orders_by_user ON orders (user_id, created_at DESC);
CREATE INDEX orders_by_sale_status ON orders (sale_id, status);
CREATE UNIQUE INDEX orders_idempotency_key
    ON orders (sale_id, user_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
