//! The dashboard's sessions: a signed cookie, no server-side state.
//!
//! After a person enters a token on the login page, the browser holds
//! `ficus_session=ACTOR.EXPIRY.MAC` (ACTOR is `api` or `token:NAME`), where the
//! MAC (HMAC-SHA256 under a key kept in the control store) covers the actor, the
//! expiry and the token's stored hash. Nothing else is kept, so every replica behind a load balancer
//! accepts the session, a restart keeps it, and rotating or revoking the token
//! ends it at once (its stored hash no longer matches, or is gone). The cookie
//! never carries the token itself. The CSRF token of a session is a second MAC
//! of the cookie's value, so it is fixed for the session and needs no storage.

use std::time::{SystemTime, UNIX_EPOCH};

use ficus_core::{Actor, TokenName};
use ficus_store::ControlStore;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::Result;
use crate::token::{self, Identity, Scope, hex, same};

/// The session cookie's name.
pub const COOKIE: &str = "ficus_session";
/// The login form's own CSRF cookie (set with the form, checked on submit).
pub const LOGIN_COOKIE: &str = "ficus_login";
/// How long a session lasts.
pub const LIFETIME_SECS: u64 = 12 * 60 * 60;
/// The setting holding the signing key (hex); made on first use.
const KEY_SETTING: &str = "ui.session_key";
/// What a session of the first token carries: the actor's stored spelling, as
/// a named token's session carries `token:NAME`, so that no name can stand for
/// the other (`:` is in no token name).
const FIRST: &str = "api";

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn mac(key: &str, parts: &[&str]) -> String {
    // HMAC takes a key of any length, so this cannot fail.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key.as_bytes())
        .unwrap_or_else(|_| unreachable!("hmac accepts any key length"));
    for p in parts {
        m.update(p.as_bytes());
        m.update(b"\n");
    }
    hex(&m.finalize().into_bytes())
}

/// The signing key, made (and kept in the store) the first time it is needed.
/// Two replicas making it at once leave one of them; sessions signed with the
/// other fail once and their holders log in again.
async fn key(store: &dyn ControlStore) -> Result<String> {
    if let Some(k) = store.setting(KEY_SETTING).await? {
        return Ok(k);
    }
    let made = token::generate()?;
    store
        .set_setting(
            KEY_SETTING,
            &made,
            "(new dashboard session key)",
            Actor::Api,
            "first dashboard login",
        )
        .await?;
    Ok(store.setting(KEY_SETTING).await?.unwrap_or(made))
}

/// The stored record a token's name stands for: its scope and stored hash, or
/// `None` when it is gone, revoked or rotated away.
async fn stored(store: &dyn ControlStore, actor: &str) -> Result<Option<(Identity, String)>> {
    if actor == FIRST {
        return Ok(store.setting(token::SETTING).await?.map(|hash| {
            (
                Identity {
                    actor: Actor::Api,
                    scope: Scope::Operator,
                },
                hash,
            )
        }));
    }
    let Some(name) = actor.strip_prefix("token:") else {
        return Ok(None);
    };
    let Ok(parsed) = TokenName::parse(name) else {
        return Ok(None);
    };
    let Some(value) = store.setting(&format!("token.{name}")).await? else {
        return Ok(None);
    };
    let Some((scope, hash)) = value.split_once(':') else {
        return Ok(None);
    };
    let Ok(scope) = Scope::parse(scope) else {
        return Ok(None);
    };
    Ok(Some((
        Identity {
            actor: Actor::Token(parsed),
            scope,
        },
        hash.to_string(),
    )))
}

/// A session for the holder of `presented`, as a cookie value, or `None` when
/// the token is not a live one.
pub async fn open(store: &dyn ControlStore, presented: &str) -> Result<Option<(String, Identity)>> {
    let Some(who) = token::identify(store, presented).await? else {
        return Ok(None);
    };
    let name = match &who.actor {
        Actor::Token(_) => who.actor.as_str().to_string(),
        _ => FIRST.to_string(),
    };
    let Some((_, hash)) = stored(store, &name).await? else {
        return Ok(None);
    };
    let expiry = (now_secs() + LIFETIME_SECS).to_string();
    let key = key(store).await?;
    let signature = mac(&key, &["session", &name, &expiry, &hash]);
    Ok(Some((format!("{name}.{expiry}.{signature}"), who)))
}

/// A checked session: who holds it, and the CSRF token its forms carry (the
/// same for the session's whole life).
pub struct Checked {
    pub who: Identity,
    pub csrf: String,
}

/// Who a session cookie belongs to, or `None` when it is forged, expired, or its
/// token was revoked or rotated since.
pub async fn check(store: &dyn ControlStore, cookie: &str) -> Result<Option<Checked>> {
    let mut parts = cookie.splitn(3, '.');
    let (Some(name), Some(expiry), Some(signature)) = (parts.next(), parts.next(), parts.next())
    else {
        return Ok(None);
    };
    let Ok(until) = expiry.parse::<u64>() else {
        return Ok(None);
    };
    if until <= now_secs() {
        return Ok(None);
    }
    let Some((who, hash)) = stored(store, name).await? else {
        return Ok(None);
    };
    let Some(key) = store.setting(KEY_SETTING).await? else {
        return Ok(None);
    };
    let expected = mac(&key, &["session", name, expiry, &hash]);
    Ok(same(&expected, signature).then(|| Checked {
        who,
        csrf: mac(&key, &["csrf", cookie]),
    }))
}

/// A fresh random value for the login form's CSRF cookie.
pub fn login_nonce() -> Result<String> {
    token::random_hex(16)
}

/// Whether two login nonces agree (constant time).
pub fn nonce_ok(cookie: &str, form: &str) -> bool {
    !cookie.is_empty() && same(cookie, form)
}
