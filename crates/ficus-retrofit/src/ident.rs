//! SQL identifiers and literals. Every name Ficus puts into SQL goes through
//! [`quote`], whatever its source (the catalog, the plan file, the command line),
//! so a table called `order` or `Weird "Name"` is always the table it names.

use std::fmt;

/// Quotes an identifier: wrapped in double quotes, inner quotes doubled.
pub fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes a string literal: wrapped in single quotes, inner quotes doubled. Used
/// only for values Ficus itself produced and validated (tenant zero's id, a type
/// name from a fixed list), in DDL where parameters are not allowed.
pub fn literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// A schema-qualified table name.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct Table {
    pub schema: String,
    pub name: String,
}

impl Table {
    pub fn new(schema: &str, name: &str) -> Table {
        Table {
            schema: schema.to_string(),
            name: name.to_string(),
        }
    }

    /// `"schema"."name"`, for SQL.
    pub fn sql(&self) -> String {
        format!("{}.{}", quote(&self.schema), quote(&self.name))
    }

    /// A short name for objects Ficus creates on this table (indexes,
    /// constraints), within PostgreSQL's 63-byte limit and unique per table.
    pub fn object_name(&self, suffix: &str) -> String {
        let base = format!("{}_{}", self.name, suffix);
        if base.len() <= 63 {
            return base;
        }
        // Keep the end (the suffix says what it is) and a fingerprint of the whole.
        let hash = fnv(&format!("{}.{}", self.schema, self.name));
        let room = 63 - suffix.len() - 10;
        let head: String = self.name.chars().take(room).collect();
        format!("{head}_{hash:08x}_{suffix}")
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.schema == "public" {
            write!(f, "{}", self.name)
        } else {
            write!(f, "{}.{}", self.schema, self.name)
        }
    }
}

fn fnv(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// A `DO $tag$ … $tag$` block whose dollar-quote tag appears nowhere in its
/// body. `sql` is written with `tag` as its delimiters; a catalog name inside
/// the body that contains the same tag (names may hold `$`) would otherwise end
/// the quoted body early and let the rest run as SQL of its own.
pub fn safe_do(sql: &str, tag: &str) -> String {
    let open = format!("DO ${tag}$");
    let close = format!("${tag}$");
    let Some(body) = sql
        .strip_prefix(&open)
        .and_then(|rest| rest.strip_suffix(&close))
    else {
        return sql.to_string();
    };
    let mut n = 0u32;
    let mut fresh = format!("${tag}$");
    while body.contains(&fresh) {
        n += 1;
        fresh = format!("${tag}{n}$");
    }
    format!("DO {fresh}{body}{fresh}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_holding_the_dollar_tag_cannot_end_a_do_block() {
        let sql = "DO $grant$ BEGIN PERFORM 'x$grant$; DROP TABLE t; --'; END $grant$";
        assert_eq!(
            safe_do(sql, "grant"),
            "DO $grant1$ BEGIN PERFORM 'x$grant$; DROP TABLE t; --'; END $grant1$"
        );
        assert_eq!(safe_do("DO $v$ BEGIN END $v$", "v"), "DO $v$ BEGIN END $v$");
    }

    #[test]
    fn quoting_survives_reserved_words_quotes_and_case() {
        assert_eq!(quote("order"), "\"order\"");
        assert_eq!(quote("Weird \"Name\""), "\"Weird \"\"Name\"\"\"");
        assert_eq!(literal("it's"), "'it''s'");
        assert_eq!(
            Table::new("public", "Weird \"Name\"").sql(),
            "\"public\".\"Weird \"\"Name\"\"\""
        );
        let long = Table::new("public", &"x".repeat(80));
        let name = long.object_name("tenant_id_idx");
        assert!(
            name.len() <= 63 && name.ends_with("_tenant_id_idx"),
            "{name}"
        );
    }
}
