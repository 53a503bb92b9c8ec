//! The portal's schema as the legacy application created it — single-tenant,
//! with no notion of a tenant anywhere — and its sample data.

use tokio_postgres::Client;

/// The tables, owned by whoever runs it (the legacy application's role).
pub const SCHEMA: &str = r#"
CREATE TABLE homes (
    id bigserial PRIMARY KEY,
    address text NOT NULL,
    city text NOT NULL,
    price bigint NOT NULL CHECK (price > 0),
    bedrooms int NOT NULL CHECK (bedrooms > 0),
    -- The Idempotency-Key a client saved the home with: a retried save is
    -- applied once.
    request_key text UNIQUE
);
CREATE TABLE valuations (
    id bigserial PRIMARY KEY,
    home_id bigint NOT NULL REFERENCES homes (id),
    value bigint NOT NULL,
    valued_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX valuations_home ON valuations (home_id, valued_at);
CREATE TABLE saved_searches (
    id bigserial PRIMARY KEY,
    owner text NOT NULL,
    city text NOT NULL,
    max_price bigint NOT NULL
);
CREATE TABLE notifications (
    id bigserial PRIMARY KEY,
    search_id bigint NOT NULL REFERENCES saved_searches (id),
    message text NOT NULL,
    read boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE schema_migrations (version text PRIMARY KEY);
INSERT INTO schema_migrations VALUES ('20240101_portal');
"#;

/// The cities the sample homes are in.
pub const CITIES: &[&str] = &["Lisbon", "Porto", "Utrecht", "Leeds", "Lyon"];

/// Creates the schema and `homes` sample homes, each with two valuations, and a
/// saved search per city with a notification.
pub async fn load(client: &Client, homes: u32) -> Result<(), tokio_postgres::Error> {
    client.batch_execute(SCHEMA).await?;
    client
        .execute(
            "INSERT INTO homes (address, city, price, bedrooms)
             SELECT g || ' Harbour Street', (ARRAY['Lisbon','Porto','Utrecht','Leeds','Lyon'])[1 + g % 5],
                    150000 + (g::bigint * 7919) % 600000, 1 + g % 5
             FROM generate_series(1, $1::int) g",
            &[&(homes as i32)],
        )
        .await?;
    client
        .batch_execute(
            "INSERT INTO valuations (home_id, value, valued_at)
               SELECT id, price - 5000, now() - interval '90 days' FROM homes;
             INSERT INTO valuations (home_id, value) SELECT id, price + 2500 FROM homes;
             INSERT INTO saved_searches (owner, city, max_price)
               SELECT 'owner-' || c, c, 400000 FROM unnest(ARRAY['Lisbon','Porto','Utrecht','Leeds','Lyon']) c;
             INSERT INTO notifications (search_id, message)
               SELECT id, 'new homes in ' || city FROM saved_searches;
             ANALYZE;",
        )
        .await
}
