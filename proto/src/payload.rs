//! Opaque bytes that read well in both encodings.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Task input and output bytes.
///
/// In MessagePack they are a `bin` value. In JSON, which operators type by hand with the `nats`
/// CLI, they are a plain string when the bytes are UTF-8 and `{"base64": "…"}` otherwise, so
/// `{"input": "hello"}` works and binary data still round-trips.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Payload(pub Bytes);

impl Payload {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<Bytes> for Payload {
    fn from(bytes: Bytes) -> Self {
        Self(bytes)
    }
}

impl From<Vec<u8>> for Payload {
    fn from(bytes: Vec<u8>) -> Self {
        Self(Bytes::from(bytes))
    }
}

impl From<&'static str> for Payload {
    fn from(text: &'static str) -> Self {
        Self(Bytes::from_static(text.as_bytes()))
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 64;
        let head = &self.0[..self.0.len().min(SHOWN)];
        write!(
            f,
            "Payload({} bytes: {:?}",
            self.0.len(),
            String::from_utf8_lossy(head)
        )?;
        if self.0.len() > SHOWN {
            f.write_str("…")?;
        }
        f.write_str(")")
    }
}

impl Serialize for Payload {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if !serializer.is_human_readable() {
            return serializer.serialize_bytes(&self.0);
        }
        match std::str::from_utf8(&self.0) {
            Ok(text) => serializer.serialize_str(text),
            Err(_) => {
                use serde::ser::SerializeMap;
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry("base64", &BASE64.encode(&self.0))?;
                map.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(PayloadVisitor)
    }
}

struct PayloadVisitor;

impl<'de> Visitor<'de> for PayloadVisitor {
    type Value = Payload;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("bytes, a string, or {\"base64\": \"…\"}")
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Payload, E> {
        Ok(Payload(Bytes::copy_from_slice(v)))
    }

    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Payload, E> {
        Ok(Payload(Bytes::from(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Payload, E> {
        Ok(Payload(Bytes::copy_from_slice(v.as_bytes())))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Payload, E> {
        Ok(Payload(Bytes::from(v)))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Payload, E> {
        Ok(Payload::default())
    }

    fn visit_none<E: de::Error>(self) -> Result<Payload, E> {
        Ok(Payload::default())
    }

    /// An array of byte values, which is how a generic JSON encoder writes bytes.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Payload, A::Error> {
        // The hint is the length the sender wrote in the array header, up to 4 GiB in
        // MessagePack: trusting it would let a 5-byte header allocate that much.
        const MAX_PREALLOCATION: usize = 64 * 1024;
        let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(MAX_PREALLOCATION));
        while let Some(byte) = seq.next_element::<u8>()? {
            bytes.push(byte);
        }
        Ok(Payload(Bytes::from(bytes)))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Payload, A::Error> {
        let mut decoded = None;
        while let Some(key) = map.next_key::<String>()? {
            if key != "base64" {
                return Err(de::Error::unknown_field(&key, &["base64"]));
            }
            let text: String = map.next_value()?;
            decoded = Some(
                BASE64
                    .decode(text.as_bytes())
                    .map_err(|err| de::Error::custom(format!("invalid base64: {err}")))?,
            );
        }
        decoded
            .map(|bytes| Payload(Bytes::from(bytes)))
            .ok_or_else(|| de::Error::missing_field("base64"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_a_plain_json_string() {
        let json = serde_json::to_string(&Payload::from("hello")).unwrap();
        assert_eq!(json, "\"hello\"");
        let back: Payload = serde_json::from_str(&json).unwrap();
        assert_eq!(back.as_bytes(), b"hello");
    }

    #[test]
    fn binary_is_base64_in_json() {
        let bytes = Payload::from(vec![0xff, 0x00, 0x10]);
        let json = serde_json::to_string(&bytes).unwrap();
        assert_eq!(json, r#"{"base64":"/wAQ"}"#);
        let back: Payload = serde_json::from_str(&json).unwrap();
        assert_eq!(back, bytes);
    }

    #[test]
    fn msgpack_uses_bin() {
        let bytes = Payload::from(vec![0xff, 0x00]);
        let packed = rmp_serde::to_vec(&bytes).unwrap();
        // 0xc4 is MessagePack's bin 8 marker.
        assert_eq!(packed, vec![0xc4, 2, 0xff, 0x00]);
        let back: Payload = rmp_serde::from_slice(&packed).unwrap();
        assert_eq!(back, bytes);
    }

    #[test]
    fn a_lying_array_header_does_not_allocate_its_claim() {
        // An array header claiming 4 Gi elements, followed by nothing: must fail quickly
        // instead of reserving 4 GiB.
        let hostile = [0xdd, 0xff, 0xff, 0xff, 0xff];
        assert!(rmp_serde::from_slice::<Payload>(&hostile).is_err());
    }

    #[test]
    fn bad_base64_is_an_error() {
        let err = serde_json::from_str::<Payload>(r#"{"base64":"!!"}"#).unwrap_err();
        assert!(err.to_string().contains("invalid base64"), "{err}");
    }
}
