-- Every order of a hot sale names the same sales row, and the foreign key
-- made each inserted order take a FOR KEY SHARE lock on it; with several
-- order writers PostgreSQL turned those into multixacts, which cost more than
-- the insert itself. Sales are never deleted, and the order writers check
-- each sale id once per connection and dead-letter a message naming an
-- unknown sale (persistence::order_log::OrderStore), so the key is dropped.
ALTER TABLE orders DROP CONSTRAINT IF EXISTS orders_sale_id_fkey;
