//! Node identity: each agent holds an ed25519 key pair (an nkey whose public half starts with
//! `N`), and signs the exact bytes of every register and heartbeat body with it. The public
//! key and the signature travel in headers ([`headers::NODE_KEY`], [`headers::SIGNATURE`]),
//! so the body stays the same message in MessagePack or JSON, and any client that can make an
//! ed25519 signature can speak for a node.

use async_nats::HeaderMap;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
pub use nkeys::KeyPair;

use crate::headers;

/// Why a signed message does not verify.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error(
        "the message is not signed (no {} or {} header)",
        headers::NODE_KEY,
        headers::SIGNATURE
    )]
    Unsigned,
    #[error("the signing key is not a node public key")]
    BadKey,
    #[error("the signature is not base64url")]
    BadEncoding,
    #[error("the signature does not match the body")]
    Mismatch,
}

/// Why a node key could not be made or read.
#[derive(Debug, thiserror::Error)]
#[error("invalid node key: {0}")]
pub struct KeyError(String);

/// A new node key pair.
pub fn generate() -> KeyPair {
    KeyPair::new_server()
}

/// A node key pair from its seed (`SN…`), as kept in the agent's state directory.
pub fn from_seed(seed: &str) -> Result<KeyPair, KeyError> {
    let pair = KeyPair::from_seed(seed.trim()).map_err(|err| KeyError(err.to_string()))?;
    if !is_node_key(&pair.public_key()) {
        return Err(KeyError("the seed is not a node (N) key".into()));
    }
    Ok(pair)
}

fn is_node_key(public_key: &str) -> bool {
    public_key.starts_with('N') && nkeys::KeyPair::from_public_key(public_key).is_ok()
}

/// The headers that sign `body` with `key`.
pub fn sign(key: &KeyPair, body: &[u8]) -> Result<HeaderMap, KeyError> {
    let signature = key.sign(body).map_err(|err| KeyError(err.to_string()))?;
    let mut map = HeaderMap::new();
    map.insert(headers::NODE_KEY, key.public_key().as_str());
    map.insert(
        headers::SIGNATURE,
        URL_SAFE_NO_PAD.encode(signature).as_str(),
    );
    Ok(map)
}

/// Checks that `body` was signed by the node key named in `headers`; returns that key.
pub fn verify(headers: Option<&HeaderMap>, body: &[u8]) -> Result<String, SignatureError> {
    let header = |name| {
        headers
            .and_then(|map| map.get(name))
            .map(|value| value.as_str())
    };
    let (Some(public_key), Some(signature)) =
        (header(headers::NODE_KEY), header(headers::SIGNATURE))
    else {
        return Err(SignatureError::Unsigned);
    };
    if !public_key.starts_with('N') {
        return Err(SignatureError::BadKey);
    }
    let verifier = KeyPair::from_public_key(public_key).map_err(|_| SignatureError::BadKey)?;
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| SignatureError::BadEncoding)?;
    verifier
        .verify(body, &signature)
        .map_err(|_| SignatureError::Mismatch)?;
    Ok(public_key.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_body_verifies_as_its_key() {
        let key = generate();
        let headers = sign(&key, b"hello").unwrap();
        assert_eq!(verify(Some(&headers), b"hello"), Ok(key.public_key()));
    }

    #[test]
    fn a_changed_body_or_a_foreign_signature_does_not_verify() {
        let key = generate();
        let headers = sign(&key, b"hello").unwrap();
        assert_eq!(
            verify(Some(&headers), b"hellO"),
            Err(SignatureError::Mismatch)
        );

        // Another key's signature under this key's name.
        let other = sign(&generate(), b"hello").unwrap();
        let mut forged = HeaderMap::new();
        forged.insert(headers::NODE_KEY, key.public_key().as_str());
        forged.insert(
            headers::SIGNATURE,
            other.get(headers::SIGNATURE).unwrap().as_str(),
        );
        assert_eq!(
            verify(Some(&forged), b"hello"),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(verify(None, b"hello"), Err(SignatureError::Unsigned));
    }

    #[test]
    fn only_node_keys_sign() {
        let user = KeyPair::new_user();
        let headers = sign(&user, b"x").unwrap();
        assert_eq!(verify(Some(&headers), b"x"), Err(SignatureError::BadKey));
        assert!(from_seed(&user.seed().unwrap()).is_err());
        let node = generate();
        assert_eq!(
            from_seed(&node.seed().unwrap()).unwrap().public_key(),
            node.public_key()
        );
    }
}
