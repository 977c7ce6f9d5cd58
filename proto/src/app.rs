//! The app store and app messaging: what a key, a key prefix, a topic and a topic filter
//! may look like inside a [`Namespace`](crate::Namespace).
//!
//! A namespace is one JetStream KV bucket ([`crate::topology::app_bucket_name`]) and one
//! subject tree ([`crate::subject::app_topic`]). A key or topic is checked here before it is
//! put into a subject, so that no spelling (a wildcard, an empty token, a leading dot) can
//! make a subject that reaches outside the namespace: keys and topics are one or more tokens
//! of `[A-Za-z0-9_=/-]`, joined by single dots. Topic filters may also use `*` for a whole
//! token and `>` as the last token; they match inside the namespace only, because the
//! namespace's own tokens come first in every subject.

/// Why a key, prefix, topic or filter was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("{what} is {len} bytes long, more than the {max} allowed")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{what} {value:?} has an empty token (a leading, trailing or doubled '.')")]
    EmptyToken { what: &'static str, value: String },
    #[error(
        "{what} {value:?} contains {found:?}; only ASCII letters, digits and '-', '_', '=', '/' are allowed, in tokens joined by '.'"
    )]
    InvalidCharacter {
        what: &'static str,
        value: String,
        found: char,
    },
    #[error("{what} {value:?} uses a wildcard where one is not allowed")]
    Wildcard { what: &'static str, value: String },
}

/// The longest key or topic, in bytes: well inside a subject, with room for the prefix.
pub const MAX_NAME_LEN: usize = 512;

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '=' | '/')
}

/// How the tokens of a name are checked.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wildcards {
    /// None: a key or a topic to publish to.
    Refused,
    /// `*` as a whole token, `>` as the last: a topic filter.
    Allowed,
}

fn check(what: &'static str, value: &str, wildcards: Wildcards) -> Result<(), NameError> {
    if value.is_empty() {
        return Err(NameError::Empty { what });
    }
    if value.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong {
            what,
            len: value.len(),
            max: MAX_NAME_LEN,
        });
    }
    let tokens: Vec<&str> = value.split('.').collect();
    let last = tokens.len() - 1;
    for (index, token) in tokens.iter().enumerate() {
        if token.is_empty() {
            return Err(NameError::EmptyToken {
                what,
                value: value.to_owned(),
            });
        }
        let wildcard = *token == "*" || (*token == ">" && index == last);
        if wildcard {
            if wildcards == Wildcards::Refused {
                return Err(NameError::Wildcard {
                    what,
                    value: value.to_owned(),
                });
            }
            continue;
        }
        if let Some(found) = token.chars().find(|c| !is_name_char(*c)) {
            return Err(if matches!(found, '*' | '>') {
                NameError::Wildcard {
                    what,
                    value: value.to_owned(),
                }
            } else {
                NameError::InvalidCharacter {
                    what,
                    value: value.to_owned(),
                    found,
                }
            });
        }
    }
    Ok(())
}

/// Checks a key of the app store.
pub fn check_key(key: &str) -> Result<(), NameError> {
    check("key", key, Wildcards::Refused)
}

/// Checks a topic to publish to.
pub fn check_topic(topic: &str) -> Result<(), NameError> {
    check("topic", topic, Wildcards::Refused)
}

/// Checks a topic filter to subscribe with: a topic, or one with `*` tokens and a last `>`.
pub fn check_topic_filter(filter: &str) -> Result<(), NameError> {
    check("topic filter", filter, Wildcards::Allowed)
}

/// A key prefix, split into what the server can filter on and what the client must.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPrefix {
    /// The whole tokens of the prefix as a KV key filter (`a.b.>`, or `>` for all keys).
    pub filter: String,
    /// The whole prefix, which every listed key must start with.
    pub prefix: String,
}

impl KeyPrefix {
    /// Parses a key prefix: empty (every key), whole tokens ending in a dot (`users.`), or
    /// ending part-way into a token (`users.al`).
    pub fn parse(prefix: &str) -> Result<Self, NameError> {
        if prefix.is_empty() {
            return Ok(Self {
                filter: ">".to_owned(),
                prefix: String::new(),
            });
        }
        // Checked as a key, with the trailing dot (if any) taken off first.
        check(
            "key prefix",
            prefix.strip_suffix('.').unwrap_or(prefix),
            Wildcards::Refused,
        )?;
        let whole = match prefix.rfind('.') {
            Some(dot) => &prefix[..=dot],
            None => "",
        };
        Ok(Self {
            filter: format!("{whole}>"),
            prefix: prefix.to_owned(),
        })
    }

    /// Whether `key` starts with the prefix.
    pub fn matches(&self, key: &str) -> bool {
        key.starts_with(&self.prefix)
    }
}

/// A namespace's store settings, fixed when its bucket is created.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct StoreSettings {
    /// How many values of each key are kept (1 to 64); `history` reads them.
    pub history: u8,
    /// How long a value lives after it is written, in milliseconds; `None` for ever.
    pub ttl_ms: Option<u64>,
    /// The largest value, in bytes; `None` for the server's limit (`max_payload`).
    pub max_value_size: Option<u32>,
    /// The most the namespace's values may take in all, in bytes; `None` for no limit.
    pub max_bytes: Option<u64>,
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            history: 1,
            ttl_ms: None,
            max_value_size: None,
            max_bytes: None,
        }
    }
}

/// The most values of one key a namespace may keep (JetStream's KV limit).
pub const MAX_HISTORY: u8 = 64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_dot_joined_tokens_without_wildcards() {
        for key in ["a", "users.42", "a-b_c=d/e", "x.y.z"] {
            assert_eq!(check_key(key), Ok(()), "{key}");
        }
        let refused = |key: &str| check_key(key).expect_err(key);
        assert!(matches!(refused(""), NameError::Empty { .. }));
        for key in [".a", "a.", "a..b", "."] {
            assert!(
                matches!(refused(key), NameError::EmptyToken { .. }),
                "{key}"
            );
        }
        for key in ["*", "a.*", ">", "a.>", "a*", "b>"] {
            assert!(matches!(refused(key), NameError::Wildcard { .. }), "{key}");
        }
        for key in ["a b", "ü", "a\tb", "$KV", "a\r\n"] {
            assert!(
                matches!(refused(key), NameError::InvalidCharacter { .. }),
                "{key}"
            );
        }
        let long = "k".repeat(MAX_NAME_LEN + 1);
        assert!(matches!(refused(&long), NameError::TooLong { .. }));
    }

    #[test]
    fn topic_filters_allow_whole_token_wildcards_only() {
        for filter in ["chat", "chat.*", "chat.>", "*.room", ">", "*"] {
            assert_eq!(check_topic_filter(filter), Ok(()), "{filter}");
        }
        for filter in ["chat.>.x", "ch*", "a..b", ".>", "chat."] {
            assert!(check_topic_filter(filter).is_err(), "{filter}");
        }
        assert!(check_topic("chat.*").is_err());
    }

    #[test]
    fn a_key_prefix_filters_whole_tokens_on_the_server_and_the_rest_here() {
        let all = KeyPrefix::parse("").unwrap();
        assert_eq!(all.filter, ">");
        assert!(all.matches("anything"));

        let users = KeyPrefix::parse("users.").unwrap();
        assert_eq!(users.filter, "users.>");
        assert!(users.matches("users.1"));
        assert!(!users.matches("usersx"));

        let partial = KeyPrefix::parse("users.al").unwrap();
        assert_eq!(partial.filter, "users.>");
        assert!(partial.matches("users.alice"));
        assert!(!partial.matches("users.bob"));

        let bare = KeyPrefix::parse("us").unwrap();
        assert_eq!(bare.filter, ">");
        assert!(bare.matches("users.1"));

        for bad in [".", "a..", "a.*", ">", "a b"] {
            assert!(KeyPrefix::parse(bad).is_err(), "{bad}");
        }
    }
}
