//! The API's bearer token. `ficus init` makes one and shows it once; the store
//! keeps only its SHA-256, so a copy of the store does not grant access. A token
//! carries 256 random bits, which is why a plain hash (no salt, no stretching) is
//! enough: there is nothing to guess. Comparison runs in constant time.

use ficus_core::Actor;
use ficus_store::ControlStore;
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// The setting holding the token's hash.
pub const SETTING: &str = "api_token_sha256";
/// Every token starts with this, so a leaked one is recognisable in a scan.
const PREFIX: &str = "ficus_";

/// A fresh token.
pub fn generate() -> Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| Error::Invalid(format!("the system has no randomness for a token: {e}")))?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("{PREFIX}{hex}"))
}

/// The stored form of a token.
pub fn hash(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether `presented` is the token whose hash is `stored`, in time that does not
/// depend on where they differ.
pub fn matches(presented: &str, stored: &str) -> bool {
    let given = hash(presented);
    given.len() == stored.len()
        && given
            .bytes()
            .zip(stored.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
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
