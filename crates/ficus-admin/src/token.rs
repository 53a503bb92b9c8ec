//! The API's bearer tokens. `ficus init` makes the first one (an operator's,
//! acting as `api` in the audit log) and shows it once; `ficus token create NAME
//! --scope viewer|operator` makes named ones, whose changes the audit log records
//! as `token:NAME`. The store keeps only each token's SHA-256, so a copy of the
//! store does not grant access. A token carries 256 random bits, which is why a
//! plain hash (no salt, no stretching) is enough: there is nothing to guess.
//! Comparison runs in constant time. A revoked token stays listed (its name
//! stays taken, so an old audit entry never names a newer token) and stops
//! working at once: every request reads the tokens afresh.

use std::fmt;

use ficus_core::{Actor, TokenName};
use ficus_store::ControlStore;
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// The setting holding the token's hash.
pub const SETTING: &str = "api_token_sha256";
/// Every token starts with this, so a leaked one is recognisable in a scan.
const PREFIX: &str = "ficus_";

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `n` random bytes from the system, as hex.
pub(crate) fn random_hex(n: usize) -> Result<String> {
    let mut bytes = vec![0u8; n];
    getrandom::fill(&mut bytes)
        .map_err(|e| Error::Invalid(format!("the system has no randomness: {e}")))?;
    Ok(hex(&bytes))
}

/// Whether `a` and `b` are equal, in time that does not depend on where they
/// differ (only on their lengths).
pub(crate) fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// A fresh token.
pub fn generate() -> Result<String> {
    Ok(format!("{PREFIX}{}", random_hex(32)?))
}

/// The stored form of a token.
pub fn hash(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

/// Whether `presented` is the token whose hash is `stored`, in time that does not
/// depend on where they differ.
pub fn matches(presented: &str, stored: &str) -> bool {
    same(&hash(presented), stored)
}

/// Replaces the token; returns the new one, which is shown once and never stored.
pub async fn rotate(store: &dyn ControlStore, actor: Actor, reason: &str) -> Result<String> {
    let token = generate()?;
    store
        .set_setting(SETTING, &hash(&token), "(new api token)", actor, reason)
        .await?;
    Ok(token)
}

/// Makes a token when the store has none; returns it when one was made.
pub async fn ensure(store: &dyn ControlStore, actor: Actor) -> Result<Option<String>> {
    if store.setting(SETTING).await?.is_some() {
        return Ok(None);
    }
    rotate(store, actor, "first api token, made by ficus init")
        .await
        .map(Some)
}

/// Where named tokens live: one setting each, `token.NAME`.
const NAMED: &str = "token.";
/// A live token's setting is `SCOPE:SHA256`; a revoked one's is
/// `revoked/SCOPE`, keeping the scope for the listing and nothing to match.
const REVOKED: &str = "revoked";

/// Names a token may not take: the audit log's other actors, so that a name
/// shown alone (in the dashboard's header) is never one of them.
const RESERVED: &[&str] = &["api", "cli", "guard", "provisioning", "proxy"];

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Read everything; change nothing.
    Viewer,
    /// Read and act: promote, roll back, retire, change settings.
    Operator,
}

impl Scope {
    pub fn parse(raw: &str) -> Result<Scope> {
        match raw {
            "viewer" => Ok(Scope::Viewer),
            "operator" => Ok(Scope::Operator),
            _ => Err(Error::Invalid(format!(
                "unknown token scope {raw:?}: expected viewer or operator"
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Viewer => "viewer",
            Scope::Operator => "operator",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// Who a request's token says it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// How changes made with the token are recorded.
    pub actor: Actor,
    pub scope: Scope,
}

impl Identity {
    /// The name shown to people: the token's name, or `api` for the first token.
    pub fn name(&self) -> &str {
        match &self.actor {
            Actor::Token(name) => name.as_str(),
            other => other.as_str(),
        }
    }
}

/// A named token as `ficus token list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedToken {
    pub name: String,
    pub scope: Scope,
    pub revoked: bool,
}

/// Makes a named token; returns it, shown once and never stored. A name is
/// never reused, even after its token is revoked.
pub async fn create(
    store: &dyn ControlStore,
    name: &str,
    scope: Scope,
    actor: Actor,
    reason: &str,
) -> Result<String> {
    let name = TokenName::parse(name).map_err(|e| Error::Invalid(e.to_string()))?;
    if RESERVED.contains(&name.as_str()) {
        return Err(Error::Invalid(format!(
            "{name} names the audit log's own actors; choose another token name"
        )));
    }
    let key = format!("{NAMED}{}", name.as_str());
    if store.setting(&key).await?.is_some() {
        return Err(Error::Refused(format!(
            "a token named {name} exists or existed; names are not reused, so the audit log names one token each"
        )));
    }
    let token = generate()?;
    store
        .set_setting(
            &key,
            &format!("{}:{}", scope.as_str(), hash(&token)),
            &format!("(new {scope} token)"),
            actor,
            reason,
        )
        .await?;
    Ok(token)
}

/// Every named token, revoked ones included.
pub async fn list(store: &dyn ControlStore) -> Result<Vec<NamedToken>> {
    let mut out = Vec::new();
    for (key, value) in store.settings_under(NAMED).await? {
        let name = key[NAMED.len()..].to_string();
        let (scope, revoked) = match value.strip_prefix(REVOKED) {
            Some(kept) => (kept.trim_start_matches('/'), true),
            None => (value.split(':').next().unwrap_or(""), false),
        };
        out.push(NamedToken {
            name,
            scope: Scope::parse(scope)?,
            revoked,
        });
    }
    Ok(out)
}

/// Revokes a named token; it stops working with the next request.
pub async fn revoke(
    store: &dyn ControlStore,
    name: &str,
    actor: Actor,
    reason: &str,
) -> Result<()> {
    let name = TokenName::parse(name).map_err(|e| Error::Invalid(e.to_string()))?;
    let key = format!("{NAMED}{}", name.as_str());
    let Some(value) = store.setting(&key).await? else {
        return Err(Error::Invalid(format!("no token is named {name}")));
    };
    if value.starts_with(REVOKED) {
        return Err(Error::Refused(format!(
            "the token {name} is already revoked"
        )));
    }
    let scope = value.split(':').next().unwrap_or("viewer");
    store
        .set_setting(
            &key,
            &format!("{REVOKED}/{scope}"),
            "(revoked)",
            actor,
            reason,
        )
        .await?;
    Ok(())
}

/// Who `presented` belongs to, or `None` for no live token. The first token
/// acts as `api` with the operator's scope.
pub async fn identify(store: &dyn ControlStore, presented: &str) -> Result<Option<Identity>> {
    if let Some(stored) = store.setting(SETTING).await?
        && matches(presented, &stored)
    {
        return Ok(Some(Identity {
            actor: Actor::Api,
            scope: Scope::Operator,
        }));
    }
    for (key, value) in store.settings_under(NAMED).await? {
        let Some((scope, stored)) = value.split_once(':') else {
            continue;
        };
        if value.starts_with(REVOKED) || !matches(presented, stored) {
            continue;
        }
        let name = TokenName::parse(&key[NAMED.len()..])
            .map_err(|e| Error::Invalid(format!("a stored token is malformed: {e}")))?;
        return Ok(Some(Identity {
            actor: Actor::Token(name),
            scope: Scope::parse(scope)?,
        }));
    }
    Ok(None)
}

/// Whether any token at all exists, so a refusal can say how to make one.
pub async fn any(store: &dyn ControlStore) -> Result<bool> {
    Ok(store.setting(SETTING).await?.is_some() || !store.settings_under(NAMED).await?.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_match_only_their_hash() {
        let (a, b) = (generate().unwrap(), generate().unwrap());
        assert_ne!(a, b);
        assert!(a.starts_with("ficus_") && a.len() == 6 + 64, "{a}");
        let stored = hash(&a);
        assert!(matches(&a, &stored));
        assert!(!matches(&b, &stored));
        assert!(!matches("", &stored));
        assert!(!matches(&a, "short"));
    }
}
