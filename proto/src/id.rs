//! Identifiers that travel in subjects or payloads.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a string was refused as an identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("{what} is {len} characters long, more than the {max} allowed")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error(
        "{what} {value:?} contains {found:?}; only ASCII letters, digits, '-' and '_' are allowed"
    )]
    InvalidCharacter {
        what: &'static str,
        value: String,
        found: char,
    },
}

const MAX_ID_LEN: usize = 64;

/// Identifiers are single NATS subject tokens (node ids are used as such) or consumer names,
/// so they are held to the characters that are safe in both: no dots, wildcards or spaces.
fn validate(what: &'static str, value: &str) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::Empty { what });
    }
    if value.len() > MAX_ID_LEN {
        return Err(IdError::TooLong {
            what,
            len: value.len(),
            max: MAX_ID_LEN,
        });
    }
    if let Some(found) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(IdError::InvalidCharacter {
            what,
            value: value.to_owned(),
            found,
        });
    }
    Ok(())
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Checks that `value` is a valid identifier and wraps it.
            pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                validate($what, &value)?;
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(value: String) -> Result<Self, IdError> {
                Self::new(value)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(value: &str) -> Result<Self, IdError> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }
    };
}

string_id!(
    /// A node's identity: one subject token, so that everything the node sends or receives
    /// can live under `apiary.v1.node.<node_id>.…` and be fenced by server permissions.
    NodeId,
    "node id"
);

string_id!(
    /// A task's identity. Task ids travel in payloads and headers, never in stream subjects,
    /// so the number of subjects JetStream tracks stays bounded by nodes, not tasks.
    TaskId,
    "task id"
);

string_id!(
    /// An application namespace: one KV bucket of the app store and one subject tree of app
    /// messaging (see [`crate::app`]). One subject token and part of a bucket name, so held
    /// to the identifier characters.
    Namespace,
    "namespace"
);

impl TaskId {
    /// A fresh, random task id (a NUID: 22 characters, unique without coordination).
    pub fn generate() -> Self {
        Self(nuid::next().to_string())
    }
}

impl NodeId {
    /// Derives a node id from a host name: dots and other characters that may not appear in a
    /// subject token become '-', so `pi-4.lan` becomes `pi-4-lan`.
    pub fn from_hostname(hostname: &str) -> Result<Self, IdError> {
        let cleaned: String = hostname
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '-'
                }
            })
            .take(MAX_ID_LEN)
            .collect();
        Self::new(cleaned.trim_matches('-'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_single_subject_tokens() {
        assert!(NodeId::new("worker-01_a").is_ok());
        assert!(matches!(
            NodeId::new("a.b"),
            Err(IdError::InvalidCharacter { found: '.', .. })
        ));
        assert!(matches!(
            NodeId::new("a*"),
            Err(IdError::InvalidCharacter { found: '*', .. })
        ));
        assert!(matches!(
            NodeId::new("a>"),
            Err(IdError::InvalidCharacter { .. })
        ));
        assert!(matches!(NodeId::new(""), Err(IdError::Empty { .. })));
        assert!(matches!(
            NodeId::new("x".repeat(65)),
            Err(IdError::TooLong { len: 65, .. })
        ));
    }

    #[test]
    fn host_names_become_node_ids() {
        assert_eq!(
            NodeId::from_hostname("pi-4.lan").unwrap().as_str(),
            "pi-4-lan"
        );
        assert_eq!(NodeId::from_hostname(".x.").unwrap().as_str(), "x");
    }

    #[test]
    fn ids_refuse_bad_input_when_deserialized() {
        let err = serde_json::from_str::<NodeId>("\"bad node\"").unwrap_err();
        assert!(err.to_string().contains("' '"), "{err}");
        let ok: TaskId = serde_json::from_str("\"abc\"").unwrap();
        assert_eq!(ok.as_str(), "abc");
    }

    #[test]
    fn generated_task_ids_are_valid_and_distinct() {
        let a = TaskId::generate();
        let b = TaskId::generate();
        assert_ne!(a, b);
        assert!(TaskId::new(a.as_str()).is_ok());
    }
}
