-- An order keeps the unit price and currency of the moment it was reserved:
-- an admin changing the sale's price changes what later reservations cost,
-- never what an existing one is charged. Orders made before this migration
-- take their sale's price now. Void rows (released reservations) have none.
ALTER TABLE orders ADD COLUMN price_cents BIGINT, ADD COLUMN currency TEXT;
UPDATE orders o SET price_cents = s.price_cents, currency = s.currency
    FROM sales s WHERE s.id = o.sale_id AND o.status <> 'void';
