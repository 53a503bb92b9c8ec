//! Store locations: `sqlite:PATH` or `postgres://…[?schema=NAME]`.

use std::path::PathBuf;
use std::str::FromStr;

use crate::StoreError;

/// Where the control store lives, parsed and checked.
#[derive(Debug, Clone)]
pub enum StoreUrl {
    Sqlite(PathBuf),
    Postgres {
        config: Box<tokio_postgres::Config>,
        /// The schema that holds Ficus's tables (`ficus` unless `?schema=` says).
        schema: String,
        /// Host, port and database, for messages; never the password.
        location: String,
    },
}

impl StoreUrl {
    pub fn parse(raw: &str) -> Result<StoreUrl, StoreError> {
        let bad = |why: &str| StoreError::BadUrl {
            url: redact(raw),
            why: why.to_string(),
        };
        if let Some(path) = raw.strip_prefix("sqlite:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err(bad("the path after `sqlite:` is empty"));
            }
            return Ok(StoreUrl::Sqlite(PathBuf::from(path)));
        }
        if raw.starts_with("postgres://") || raw.starts_with("postgresql://") {
            let (base, query) = raw.split_once('?').unwrap_or((raw, ""));
            let mut schema = "ficus".to_string();
            let mut rest = Vec::new();
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                match pair.split_once('=') {
                    Some(("schema", value)) => schema = value.to_string(),
                    _ => rest.push(pair),
                }
            }
            if !is_plain_identifier(&schema) {
                return Err(bad(
                    "schema must be a lowercase identifier ([a-z_][a-z0-9_]*, at most 63 characters)",
                ));
            }
            let pg_url = if rest.is_empty() {
                base.to_string()
            } else {
                format!("{base}?{}", rest.join("&"))
            };
            let config = tokio_postgres::Config::from_str(&pg_url)
                .map_err(|e| bad(&format!("not a valid PostgreSQL url: {e}")))?;
            let location = describe(&config);
            return Ok(StoreUrl::Postgres {
                config: Box::new(config),
                schema,
                location,
            });
        }
        Err(bad(
            "expected sqlite:PATH or postgres://USER@HOST:PORT/DATABASE",
        ))
    }
}

fn is_plain_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && s.len() <= 63
}

/// `host:port/database`, for messages.
fn describe(config: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "localhost".to_string(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let db = config
        .get_dbname()
        .or(config.get_user())
        .unwrap_or("postgres");
    format!("postgres://{host}:{port}/{db}")
}

/// The url with any password replaced, so it can appear in an error message.
pub(crate) fn redact(raw: &str) -> String {
    let Some((scheme, rest)) = raw.split_once("://") else {
        return raw.to_string();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return raw.to_string();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => raw.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(raw: &str, expect: &str) {
        let actual = match StoreUrl::parse(raw) {
            Ok(StoreUrl::Sqlite(p)) => format!("sqlite {}", p.display()),
            Ok(StoreUrl::Postgres {
                schema, location, ..
            }) => format!("{location} schema={schema}"),
            Err(e) => e.to_string(),
        };
        assert_eq!(actual, expect, "for {raw:?}");
    }

    #[test]
    fn urls() {
        check("sqlite:ficus.db", "sqlite ficus.db");
        check("sqlite:///var/lib/ficus.db", "sqlite /var/lib/ficus.db");
        check(
            "sqlite:",
            r#"invalid store url "sqlite:": the path after `sqlite:` is empty"#,
        );
        check(
            "postgres://ficus:hunter2@db.internal:6543/control",
            "postgres://db.internal:6543/control schema=ficus",
        );
        check(
            "postgres://u@h/d?schema=ops&connect_timeout=3",
            "postgres://h:5432/d schema=ops",
        );
        check(
            "postgres://u:hunter2@h/d?schema=Bad;Name",
            r#"invalid store url "postgres://u:***@h/d?schema=Bad;Name": schema must be a lowercase identifier ([a-z_][a-z0-9_]*, at most 63 characters)"#,
        );
        check(
            "mysql://h/d",
            r#"invalid store url "mysql://h/d": expected sqlite:PATH or postgres://USER@HOST:PORT/DATABASE"#,
        );
    }
}
