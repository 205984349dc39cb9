-- Payment webhook events already handled, so that an event the provider
-- delivers again answers what its first delivery did and never refunds
-- twice. `result` is NULL while the first delivery is being handled.
CREATE TABLE payment_events (
    event_id    TEXT PRIMARY KEY,
    order_id    UUID NOT NULL,
    result      TEXT,
    received_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
