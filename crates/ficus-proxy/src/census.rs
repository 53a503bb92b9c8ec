//! The route census: how many requests of each route each tenant made, which
//! backend served them, and from which client version, so that a team knows its
//! write surface before releasing it and knows when the last old client stopped
//! calling a route.
//!
//! Counted in memory per flush interval and written with the legacy-traffic
//! counts. Client versions are bounded: at most [`CLIENTS_PER_FLUSH`] distinct
//! ones per interval, the rest counted as `other`; a version that is long or not
//! printable is counted as `invalid`, never stored raw.

use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex};

use ficus_core::{TenantId, Timestamp};
use ficus_store::RouteCount;

use crate::{FastMap, FastSet};
use http::HeaderMap;

/// Distinct client versions kept per flush interval.
pub const CLIENTS_PER_FLUSH: usize = 50;

/// Distinct routes kept per flush interval; beyond, requests count as
/// `(other)`: paths nobody templated (a bot probing) must not grow the store
/// without bound.
pub const ROUTES_PER_FLUSH: usize = 1_000;

/// The longest route name kept; longer ones count as `(long)`.
const ROUTE_MAX: usize = 256;

/// The longest client version kept.
const CLIENT_MAX: usize = 64;

type Key = (Option<TenantId>, String, Arc<str>, String);

/// What one count adds: requests, the latest of them, and whether a
/// `[[routes]]` entry names the route.
#[derive(Clone, Copy)]
struct Add {
    n: u64,
    at: i64,
    configured: bool,
}

/// Counts by the hash of their key's parts, so that counting a request already
/// seen this interval allocates nothing: the parts are compared borrowed.
#[derive(Default)]
struct Counts {
    by_hash: FastMap<u64, Vec<(Key, u64, i64, bool)>>,
    clients: FastSet<String>,
    routes: FastSet<String>,
    hasher: foldhash::fast::RandomState,
}

impl Counts {
    fn hash(&self, tenant: Option<&TenantId>, route: &str, backend: &str, client: &str) -> u64 {
        let mut h = self.hasher.build_hasher();
        h.write(tenant.map_or("", TenantId::as_str).as_bytes());
        h.write_u8(0);
        h.write(route.as_bytes());
        h.write_u8(0);
        h.write(backend.as_bytes());
        h.write_u8(0);
        h.write(client.as_bytes());
        h.finish()
    }

    fn add(
        &mut self,
        tenant: Option<&TenantId>,
        route: &str,
        backend: &Arc<str>,
        client: &str,
        add: Add,
    ) {
        let Add { n, at, configured } = add;
        let h = self.hash(tenant, route, backend, client);
        if self.bump(h, tenant, route, backend, client, add) {
            return;
        }
        self.by_hash.entry(h).or_default().push((
            (
                tenant.cloned(),
                route.to_string(),
                Arc::clone(backend),
                client.to_string(),
            ),
            n,
            at,
            configured,
        ));
    }

    /// Adds to the count of this key, hashed to `h`, if it has one.
    fn bump(
        &mut self,
        h: u64,
        tenant: Option<&TenantId>,
        route: &str,
        backend: &Arc<str>,
        client: &str,
        add: Add,
    ) -> bool {
        let found = self.by_hash.get_mut(&h).and_then(|slot| {
            slot.iter_mut().find(|(k, _, _, _)| {
                k.0.as_ref() == tenant && k.1 == route && *k.2 == **backend && k.3 == client
            })
        });
        let Some(entry) = found else {
            return false;
        };
        entry.1 += add.n;
        entry.2 = entry.2.max(add.at);
        entry.3 |= add.configured;
        true
    }
}

/// Route counts since the last flush.
#[derive(Default)]
pub struct Census {
    counts: Mutex<Counts>,
}

/// The client's version: the configured header, else the User-Agent's first
/// product token (`MyApp/4.2` of `MyApp/4.2 (iPhone; iOS 17)`); `""` when there
/// is none, `"invalid"` when it is not printable ASCII. Borrowed from the
/// headers: it is read per request.
pub fn client_version<'h>(headers: &'h HeaderMap, header: Option<&http::HeaderName>) -> &'h str {
    client_version_of(client_header(
        headers,
        header,
        headers.get(http::header::USER_AGENT),
    ))
}

/// The header a client's version is read from (see [`client_version`]): the
/// configured one, else the User-Agent (`true`), which the caller has found
/// (the proxy finds it in its one pass over the headers). A request path that
/// keeps it past the request's headers keeps this, a shared reference, not a
/// copy.
pub fn client_header<'h>(
    headers: &'h HeaderMap,
    header: Option<&http::HeaderName>,
    user_agent: Option<&'h http::HeaderValue>,
) -> Option<(&'h http::HeaderValue, bool)> {
    match header.and_then(|h| headers.get(h)) {
        Some(v) => Some((v, false)),
        None => user_agent.map(|v| (v, true)),
    }
}

/// The client's version in the header [`client_header`] found.
pub fn client_version_of(found: Option<(&http::HeaderValue, bool)>) -> &str {
    let raw = match found {
        Some((v, false)) => v.as_bytes(),
        Some((v, true)) => v
            .as_bytes()
            .split(|b| *b == b' ')
            .next()
            .unwrap_or_default(),
        None => return "",
    };
    if raw.len() > CLIENT_MAX || !raw.iter().all(|b| (0x21..0x7f).contains(b)) {
        return if raw.is_empty() { "" } else { "invalid" };
    }
    // Printable ASCII, so valid UTF-8: no lossy conversion to pay for.
    std::str::from_utf8(raw).unwrap_or("invalid")
}

impl Census {
    /// Counts one request of `route` for `tenant`, served by `backend`;
    /// `configured` when a `[[routes]]` entry names the route.
    pub fn record(
        &self,
        tenant: Option<&TenantId>,
        route: &str,
        backend: &Arc<str>,
        client: &str,
        at: Timestamp,
        configured: bool,
    ) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let add = Add {
            n: 1,
            at: at.unix_millis(),
            configured,
        };
        // Most requests repeat a key already counted this interval: its route
        // and client were let in then, so the caps need no second look.
        if route.len() <= ROUTE_MAX {
            let h = c.hash(tenant, route, backend, client);
            if c.bump(h, tenant, route, backend, client, add) {
                return;
            }
        }
        let route = if route.len() > ROUTE_MAX {
            "(long)"
        } else if c.routes.contains(route) {
            route
        } else if c.routes.len() < ROUTES_PER_FLUSH {
            c.routes.insert(route.to_string());
            route
        } else {
            "(other)"
        };
        let client = if c.clients.contains(client) {
            client
        } else if c.clients.len() < CLIENTS_PER_FLUSH {
            c.clients.insert(client.to_string());
            client
        } else {
            "other"
        };
        c.add(tenant, route, backend, client, add);
    }

    /// Takes the counts gathered since the last call.
    pub fn take(&self) -> Vec<RouteCount> {
        let taken = std::mem::take(&mut *self.counts.lock().unwrap_or_else(|p| p.into_inner()));
        taken
            .by_hash
            .into_values()
            .flatten()
            .map(
                |((tenant, route, backend, client), count, at, configured)| RouteCount {
                    tenant,
                    route,
                    backend: backend.to_string(),
                    client,
                    count,
                    last_at: Timestamp::from_unix_millis(at),
                    configured,
                },
            )
            .collect()
    }

    /// Puts back counts whose write failed.
    pub fn restore(&self, counts: Vec<RouteCount>) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        for r in counts {
            let backend: Arc<str> = Arc::from(r.backend.as_str());
            c.add(
                r.tenant.as_ref(),
                &r.route,
                &backend,
                &r.client,
                Add {
                    n: r.count,
                    at: r.last_at.unix_millis(),
                    configured: r.configured,
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_is_named_by_its_header_or_its_product_token_and_bounded() {
        let mut h = HeaderMap::new();
        assert_eq!(client_version(&h, None), "");
        h.insert("user-agent", "Homes/4.2 (iPhone; iOS 17)".parse().unwrap());
        assert_eq!(client_version(&h, None), "Homes/4.2");
        let name = http::HeaderName::from_static("x-app-version");
        assert_eq!(client_version(&h, Some(&name)), "Homes/4.2");
        h.insert("x-app-version", "android-7.1".parse().unwrap());
        assert_eq!(client_version(&h, Some(&name)), "android-7.1");
        h.insert("x-app-version", "9".repeat(65).parse().unwrap());
        assert_eq!(client_version(&h, Some(&name)), "invalid");

        let census = Census::default();
        let new: Arc<str> = Arc::from("new");
        let at = Timestamp::from_unix_millis(1);
        for i in 0..CLIENTS_PER_FLUSH + 5 {
            census.record(None, "GET /homes", &new, &format!("c{i}"), at, false);
        }
        let counts = census.take();
        let other = counts.iter().find(|c| c.client == "other").unwrap();
        assert_eq!((counts.len(), other.count), (CLIENTS_PER_FLUSH + 1, 5));
    }

    #[test]
    fn a_repeated_key_is_counted_where_it_was_first_let_in() {
        let census = Census::default();
        let legacy: Arc<str> = Arc::from("legacy");
        let t = TenantId::parse("t1").unwrap();
        let at = |ms| Timestamp::from_unix_millis(ms);
        for i in 0..ROUTES_PER_FLUSH + 3 {
            census.record(Some(&t), &format!("GET /r{i}"), &legacy, "", at(1), false);
        }
        let long = format!("GET /{}", "x".repeat(ROUTE_MAX));
        // Counted again: a route let in, one past the cap, a long one.
        for ms in [2, 3] {
            census.record(Some(&t), "GET /r0", &legacy, "", at(ms), true);
            census.record(
                Some(&t),
                &format!("GET /r{ROUTES_PER_FLUSH}"),
                &legacy,
                "",
                at(ms),
                false,
            );
            census.record(Some(&t), &long, &legacy, "", at(ms), false);
        }
        let counts = census.take();
        let of = |route: &str| {
            let c = counts.iter().find(|c| c.route == route).unwrap();
            (c.count, c.last_at.unix_millis(), c.configured)
        };
        assert_eq!(counts.len(), ROUTES_PER_FLUSH + 2);
        assert_eq!(of("GET /r0"), (3, 3, true));
        assert_eq!(of("GET /r1"), (1, 1, false));
        assert_eq!(of("(other)"), (5, 3, false));
        assert_eq!(of("(long)"), (2, 3, false));
        assert!(census.take().is_empty());
    }
}
