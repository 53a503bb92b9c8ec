-- A rental shop's schema shaped like the public sample databases that broke
-- `ficus db` on first contact: the application connects as the role that owns
-- the tables, a table partitioned by month, views that run as their owner (one
-- of them over another view, one counting rows without naming a column), a
-- materialized view, a SECURITY DEFINER function with a mutable search_path,
-- and a trigger on every table. Loaded by the superuser; the objects belong to
-- rent_owner.
CREATE ROLE rent_owner LOGIN;
CREATE ROLE rent_report LOGIN;
CREATE ROLE rent_tenant LOGIN;
GRANT CREATE ON SCHEMA public TO rent_owner;
SET ROLE rent_owner;

CREATE FUNCTION last_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.last_update = now();
    RETURN NEW;
END $$;

CREATE TABLE language (language_id serial PRIMARY KEY, name character(20) NOT NULL, last_update timestamptz NOT NULL DEFAULT now());
CREATE TABLE country (country_id serial PRIMARY KEY, country text NOT NULL, last_update timestamptz NOT NULL DEFAULT now());
CREATE TABLE city (city_id serial PRIMARY KEY, city text NOT NULL, country_id int NOT NULL REFERENCES country, last_update timestamptz NOT NULL DEFAULT now());
CREATE TABLE address (address_id serial PRIMARY KEY, address text NOT NULL, city_id int NOT NULL REFERENCES city, phone text NOT NULL, last_update timestamptz NOT NULL DEFAULT now());
CREATE TABLE customer (customer_id serial PRIMARY KEY, first_name text NOT NULL, last_name text NOT NULL, email varchar(50) UNIQUE, address_id int NOT NULL REFERENCES address, active boolean NOT NULL DEFAULT true, create_date date NOT NULL DEFAULT current_date, last_update timestamptz NOT NULL DEFAULT now());
CREATE TABLE film (film_id serial PRIMARY KEY, title text NOT NULL, language_id int NOT NULL REFERENCES language, rental_rate numeric(4,2) NOT NULL DEFAULT 4.99 CHECK (rental_rate >= 0), rating text CHECK (rating IN ('G', 'PG', 'R')), last_update timestamptz NOT NULL DEFAULT now());
CREATE TABLE actor (actor_id serial PRIMARY KEY, first_name text NOT NULL, last_name text NOT NULL, last_update timestamptz NOT NULL DEFAULT now());
CREATE TABLE film_actor (actor_id int NOT NULL REFERENCES actor, film_id int NOT NULL REFERENCES film, last_update timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (actor_id, film_id));
CREATE TABLE inventory (inventory_id serial PRIMARY KEY, film_id int NOT NULL REFERENCES film, store_id int NOT NULL, last_update timestamptz NOT NULL DEFAULT now());
CREATE TABLE rental (rental_id serial PRIMARY KEY, rental_date timestamptz NOT NULL, inventory_id int NOT NULL REFERENCES inventory, customer_id int NOT NULL REFERENCES customer, return_date timestamptz, last_update timestamptz NOT NULL DEFAULT now(), UNIQUE (rental_date, inventory_id, customer_id));
CREATE TABLE payment (payment_id serial, customer_id int NOT NULL REFERENCES customer, rental_id int REFERENCES rental, amount numeric(5,2) NOT NULL CHECK (amount >= 0), payment_date timestamptz NOT NULL, last_update timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (payment_date, payment_id)) PARTITION BY RANGE (payment_date);
DO $$
BEGIN
    FOR m IN 1..12 LOOP
        EXECUTE format('CREATE TABLE payment_p2026_%s PARTITION OF payment FOR VALUES FROM (%L) TO (%L)',
            lpad(m::text, 2, '0'), make_date(2026, m, 1), make_date(2026, m, 1) + interval '1 month');
    END LOOP;
END $$;

DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['language', 'country', 'city', 'address', 'customer', 'film', 'actor', 'film_actor', 'inventory', 'rental', 'payment'] LOOP
        EXECUTE format('CREATE TRIGGER last_updated BEFORE UPDATE ON %I FOR EACH ROW EXECUTE FUNCTION last_updated()', t);
    END LOOP;
END $$;

INSERT INTO language (name) VALUES ('English'), ('Dutch'), ('French');
INSERT INTO country (country) SELECT 'Country ' || g FROM generate_series(1, 5) g;
INSERT INTO city (city, country_id) SELECT 'City ' || g, 1 + g % 5 FROM generate_series(1, 20) g;
INSERT INTO address (address, city_id, phone) SELECT g || ' Main Street', 1 + g % 20, '555-' || g FROM generate_series(1, 100) g;
INSERT INTO customer (first_name, last_name, email, address_id) SELECT 'First' || g, 'Last' || g, 'c' || g || '@example.test', 1 + g % 100 FROM generate_series(1, 200) g;
INSERT INTO film (title, language_id, rating) SELECT 'Film ' || g, 1 + g % 3, (ARRAY['G', 'PG', 'R'])[1 + g % 3] FROM generate_series(1, 100) g;
INSERT INTO actor (first_name, last_name) SELECT 'Actor', 'No ' || g FROM generate_series(1, 50) g;
INSERT INTO film_actor (actor_id, film_id) SELECT DISTINCT 1 + g % 50, 1 + (g * 7) % 100 FROM generate_series(1, 300) g;
INSERT INTO inventory (film_id, store_id) SELECT 1 + g % 100, 1 + g % 2 FROM generate_series(1, 400) g;
INSERT INTO rental (rental_date, inventory_id, customer_id) SELECT timestamptz '2026-01-01' + g * interval '2 hours', 1 + g % 400, 1 + g % 200 FROM generate_series(1, 2000) g;
INSERT INTO payment (customer_id, rental_id, amount, payment_date) SELECT 1 + g % 200, g, 1 + g % 7, timestamptz '2026-01-01' + g * interval '4 hours' FROM generate_series(1, 2000) g;

CREATE VIEW customer_list AS
    SELECT cu.customer_id AS id, cu.first_name || ' ' || cu.last_name AS name, a.address, a.phone, ci.city, co.country
    FROM customer cu JOIN address a USING (address_id) JOIN city ci USING (city_id) JOIN country co USING (country_id);
CREATE VIEW film_list AS
    SELECT f.film_id, f.title, l.name AS language, f.rental_rate FROM film f JOIN language l USING (language_id);
CREATE VIEW sales_by_film AS
    SELECT f.title, sum(p.amount) AS total
    FROM payment p JOIN rental r USING (rental_id) JOIN inventory i USING (inventory_id) JOIN film f USING (film_id)
    GROUP BY f.title;
CREATE VIEW top_customers AS
    SELECT * FROM customer_list
    WHERE id IN (SELECT customer_id FROM payment GROUP BY customer_id ORDER BY sum(amount) DESC LIMIT 10);
CREATE VIEW customer_count AS SELECT count(*) AS customers FROM customer;
CREATE MATERIALIZED VIEW rentals_by_rating AS
    SELECT f.rating, count(*) AS rentals
    FROM rental r JOIN inventory i USING (inventory_id) JOIN film f USING (film_id) GROUP BY f.rating;

-- As in the sample databases: a definer function with no search_path of its own.
CREATE FUNCTION rewards_report(min_total numeric) RETURNS SETOF customer LANGUAGE sql SECURITY DEFINER AS $$
    SELECT c.* FROM customer c
    WHERE c.customer_id IN (SELECT customer_id FROM payment GROUP BY 1 HAVING sum(amount) > min_total)
$$;

-- A reporting role that reads the views and nothing else; the tenant-aware
-- backend's role may use every table, and every view by way of a blanket grant.
GRANT SELECT ON customer_list, film_list, sales_by_film, top_customers, customer_count, rentals_by_rating TO rent_report;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO rent_tenant;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO rent_tenant;
RESET ROLE;
