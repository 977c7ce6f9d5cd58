//! The codec: MessagePack by default, JSON for people.
//!
//! Components write MessagePack (compact, with field names so that old and new versions read
//! each other). Every subject also accepts JSON, recognised by a `Content-Type:
//! application/json` header or by a body whose first non-blank byte starts a JSON value
//! (`{`, and `[`, `"`, `n`, `t`, `f`, `-` or a digit, so that `null` or `[]` is refused as
//! JSON). None of those bytes can start an apiary MessagePack message, since those are all
//! maps (0x80–0x8f, 0xde, 0xdf).
//! A reply is written in the encoding of its request, so `nats req … '{…}'` gets JSON back.

use std::fmt;

use async_nats::HeaderMap;
use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::headers;

pub const JSON_CONTENT_TYPE: &str = "application/json";
pub const MSGPACK_CONTENT_TYPE: &str = "application/msgpack";

/// How a message body is encoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Encoding {
    #[default]
    MsgPack,
    Json,
}

impl fmt::Display for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Encoding::MsgPack => "MessagePack",
            Encoding::Json => "JSON",
        })
    }
}

/// A message that could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("malformed {encoding} {type_name}: {reason}")]
    Decode {
        encoding: Encoding,
        type_name: &'static str,
        reason: String,
    },
    #[error("failed to encode {type_name} as {encoding}: {reason}")]
    Encode {
        encoding: Encoding,
        type_name: &'static str,
        reason: String,
    },
}

impl Encoding {
    /// Decides how a received body is encoded: the `Content-Type` header wins; without one, a
    /// body that starts with `{` (or is empty, as a bare `nats req subject ""` sends) is JSON,
    /// and anything else is MessagePack.
    pub fn detect(headers: Option<&HeaderMap>, payload: &[u8]) -> Encoding {
        if let Some(content_type) = headers.and_then(|h| h.get(headers::CONTENT_TYPE)) {
            let content_type = content_type.as_str().to_ascii_lowercase();
            if content_type.contains("json") {
                return Encoding::Json;
            }
            if content_type.contains("msgpack") || content_type.contains("messagepack") {
                return Encoding::MsgPack;
            }
        }
        match payload.iter().find(|b| !b.is_ascii_whitespace()) {
            None => Encoding::Json,
            Some(first) if starts_json_value(*first) => Encoding::Json,
            Some(_) => Encoding::MsgPack,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Encoding::MsgPack => MSGPACK_CONTENT_TYPE,
            Encoding::Json => JSON_CONTENT_TYPE,
        }
    }

    /// A header map that announces this encoding.
    pub fn headers(self) -> HeaderMap {
        let mut map = HeaderMap::new();
        map.insert(headers::CONTENT_TYPE, self.content_type());
        map
    }

    pub fn encode<T: Serialize>(self, value: &T) -> Result<Bytes, CodecError> {
        let encoded = match self {
            Encoding::MsgPack => rmp_serde::to_vec_named(value).map_err(|e| e.to_string()),
            Encoding::Json => serde_json::to_vec(value).map_err(|e| e.to_string()),
        };
        encoded
            .map(Bytes::from)
            .map_err(|reason| CodecError::Encode {
                encoding: self,
                type_name: short_type_name::<T>(),
                reason,
            })
    }

    pub fn decode<T: DeserializeOwned>(self, payload: &[u8]) -> Result<T, CodecError> {
        let decoded = match self {
            Encoding::MsgPack => rmp_serde::from_slice(payload).map_err(|e| e.to_string()),
            Encoding::Json if payload.iter().all(u8::is_ascii_whitespace) => {
                serde_json::from_slice(b"{}").map_err(|e| e.to_string())
            }
            Encoding::Json => serde_json::from_slice(payload).map_err(|e| e.to_string()),
        };
        decoded.map_err(|reason| CodecError::Decode {
            encoding: self,
            type_name: short_type_name::<T>(),
            reason,
        })
    }
}

/// Whether `byte` can start a JSON value: an object, and also what is not one (`null`, an
/// array, a string, a number, `true`, `false`), so that such a body is refused as the JSON
/// it is rather than as garbled MessagePack. In MessagePack each of these bytes is a whole
/// message holding one small integer, which no apiary message is.
fn starts_json_value(byte: u8) -> bool {
    matches!(
        byte,
        b'{' | b'[' | b'"' | b'n' | b't' | b'f' | b'-' | b'0'..=b'9'
    )
}

/// Detects the encoding of a received message and decodes it, returning the encoding too so
/// that the reply can be written the same way.
pub fn decode_message<T: DeserializeOwned>(
    headers: Option<&HeaderMap>,
    payload: &[u8],
) -> Result<(T, Encoding), CodecError> {
    let encoding = Encoding::detect(headers, payload);
    encoding.decode(payload).map(|value| (value, encoding))
}

/// Encodes in the default encoding, MessagePack.
pub fn encode<T: Serialize>(value: &T) -> Result<Bytes, CodecError> {
    Encoding::MsgPack.encode(value)
}

fn short_type_name<T>() -> &'static str {
    let full = std::any::type_name::<T>();
    // Keep the generic arguments readable: `Reply<RegisterReply>`, not full paths.
    full.rsplit("::").next().unwrap_or(full)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        name: String,
        #[serde(default)]
        count: u32,
    }

    #[test]
    fn detects_json_by_header_or_leading_brace() {
        let mut json_header = HeaderMap::new();
        json_header.insert(headers::CONTENT_TYPE, "application/json; charset=utf-8");
        assert_eq!(
            Encoding::detect(Some(&json_header), b"\x81"),
            Encoding::Json
        );
        assert_eq!(Encoding::detect(None, b"  {\"a\":1}"), Encoding::Json);
        assert_eq!(Encoding::detect(None, b""), Encoding::Json);
        assert_eq!(Encoding::detect(None, b"\x81\xa1a\x01"), Encoding::MsgPack);

        let mut msgpack_header = HeaderMap::new();
        msgpack_header.insert(headers::CONTENT_TYPE, MSGPACK_CONTENT_TYPE);
        assert_eq!(
            Encoding::detect(Some(&msgpack_header), b"{"),
            Encoding::MsgPack
        );
    }

    #[test]
    fn both_encodings_round_trip() {
        let sample = Sample {
            name: "x".into(),
            count: 3,
        };
        for encoding in [Encoding::MsgPack, Encoding::Json] {
            let bytes = encoding.encode(&sample).unwrap();
            assert_eq!(Encoding::detect(None, &bytes), encoding);
            let (back, detected) = decode_message::<Sample>(None, &bytes).unwrap();
            assert_eq!(back, sample);
            assert_eq!(detected, encoding);
        }
    }

    #[test]
    fn msgpack_messages_are_maps_with_field_names() {
        let bytes = encode(&Sample {
            name: "x".into(),
            count: 0,
        })
        .unwrap();
        assert_eq!(bytes[0], 0x82, "a fixmap of two entries");
        assert!(bytes.windows(4).any(|w| w == b"name"));
    }

    #[test]
    fn json_that_is_not_an_object_is_refused_as_json() {
        for body in [
            &b"null"[..],
            b"[]",
            b" [1, 2]",
            b"\"text\"",
            b"42",
            b"-1",
            b"true",
            b"false",
        ] {
            assert_eq!(Encoding::detect(None, body), Encoding::Json, "{body:?}");
            let err = decode_message::<Sample>(None, body).unwrap_err();
            assert!(
                matches!(
                    err,
                    CodecError::Decode {
                        encoding: Encoding::Json,
                        ..
                    }
                ),
                "{body:?}: {err}"
            );
        }
    }

    #[test]
    fn empty_json_means_an_empty_object() {
        #[derive(Debug, Deserialize)]
        struct Empty {}
        assert!(Encoding::Json.decode::<Empty>(b"").is_ok());
    }

    #[test]
    fn malformed_input_is_a_typed_error() {
        let err = decode_message::<Sample>(None, b"{not json").unwrap_err();
        assert!(matches!(
            err,
            CodecError::Decode {
                encoding: Encoding::Json,
                type_name: "Sample",
                ..
            }
        ));
        let err = decode_message::<Sample>(None, &[0xc1, 0x00]).unwrap_err();
        assert!(matches!(
            err,
            CodecError::Decode {
                encoding: Encoding::MsgPack,
                ..
            }
        ));
    }
}
