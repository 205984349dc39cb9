-- Nothing on the hot path reads orders by (sale, status): live counters come
-- from the stock actors and recovery reads every order. The index only cost
-- an extra insert per order row (measured: PostgreSQL was the largest CPU
-- user after the server itself during the reservation benchmark).
DROP INDEX IF EXISTS orders_by_sale_status;
