//! Join tokens: created, listed and revoked by operators, redeemed when a node id registers
//! for the first time. Only the SHA-256 of each secret is stored (KV `APIARY_CLUSTER`, key
//! `tokens.<id>`), so reading the bucket admits nobody.
//!
//! The functions are public so that tools that stand a cluster up without a CLI (the test
//! harness, the chaos driver) mint tokens exactly as the `tokens.create` endpoint does.

use apiary_proto::admin::{
    JoinToken, SecretToken, TokenCreateRequest, TokenCreated, TokenInfo, TokenRecord, TokenRefusal,
};
use apiary_proto::message::{ErrorBody, ErrorCode, Refusal};
use apiary_proto::{codec, topology};
use async_nats::jetstream::kv;
use futures::TryStreamExt as _;

/// How often a redemption retries when another registration changed the token under it.
const REDEEM_ATTEMPTS: usize = 16;

fn internal(what: &str, err: impl std::fmt::Display) -> ErrorBody {
    ErrorBody::new(ErrorCode::Internal, format!("failed to {what}: {err}"))
}

/// Creates a token and stores its hash; the returned [`TokenCreated::token`] is the only copy
/// of the secret.
pub async fn create(
    store: &kv::Store,
    request: &TokenCreateRequest,
    now_ms: u64,
) -> Result<TokenCreated, ErrorBody> {
    // A token that could never admit anything is a mistake worth saying so.
    if request.ttl_ms == Some(0) || request.max_uses == Some(0) {
        return Err(ErrorBody::new(
            ErrorCode::BadRequest,
            "a token needs a ttl and a number of uses above zero (leave them out for no limit)",
        ));
    }
    let token = JoinToken::generate().map_err(|err| internal("make a token", err))?;
    let info = TokenInfo {
        id: token.id().to_owned(),
        description: request.description.clone(),
        created_ms: now_ms,
        expires_ms: request.ttl_ms.map(|ttl| now_ms.saturating_add(ttl)),
        uses_left: request.max_uses,
        uses: 0,
        revoked_ms: None,
    };
    let record = TokenRecord {
        info: info.clone(),
        secret_sha256: token.secret_sha256(),
        redeemed_by: Default::default(),
    };
    let value = codec::encode(&record).map_err(|err| internal("encode the token", err))?;
    store
        .create(topology::token_key(token.id()), value)
        .await
        .map_err(|err| internal("store the token", err))?;
    tracing::info!(token_id = %info.id, description = %info.description, "join token created");
    Ok(TokenCreated {
        token: token.expose(),
        info,
    })
}

/// Every token, oldest first.
pub async fn list(store: &kv::Store) -> Result<Vec<TokenInfo>, ErrorBody> {
    let keys: Vec<String> = store
        .keys()
        .await
        .map_err(|err| internal("list the tokens", err))?
        .try_collect()
        .await
        .map_err(|err| internal("list the tokens", err))?;
    let mut tokens = Vec::new();
    for key in keys
        .iter()
        .filter(|key| topology::parse_token_key(key).is_some())
    {
        if let Some((record, _)) = read(store, key).await? {
            tokens.push(record.info);
        }
    }
    tokens.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
    Ok(tokens)
}

/// Revokes a token: it admits no new node, and nodes it admitted keep working.
pub async fn revoke(store: &kv::Store, id: &str, now_ms: u64) -> Result<TokenInfo, ErrorBody> {
    if !JoinToken::is_id(id) {
        return Err(ErrorBody::new(
            ErrorCode::BadRequest,
            format!("{id:?} is not a token id (12 lowercase hex digits, as `tokens ls` shows)"),
        ));
    }
    let key = topology::token_key(id);
    for _ in 0..REDEEM_ATTEMPTS {
        let Some((mut record, revision)) = read(store, &key).await? else {
            return Err(ErrorBody::new(
                ErrorCode::NotFound,
                format!("no join token {id}"),
            ));
        };
        if record.info.revoked_ms.is_some() {
            return Ok(record.info);
        }
        record.info.revoked_ms = Some(now_ms);
        if update(store, &key, &record, revision).await? {
            tracing::info!(token_id = %id, "join token revoked");
            return Ok(record.info);
        }
        crate::contention_pause().await;
    }
    Err(internal("revoke the token", "it kept changing"))
}

/// Admits the new node with `public_key` with `presented`, counting the use (once per key:
/// a retried registration costs nothing more). Returns the token's id; a refusal says
/// precisely why.
pub(crate) async fn redeem(
    store: &kv::Store,
    presented: Option<&SecretToken>,
    public_key: &str,
    now_ms: u64,
) -> Result<String, ErrorBody> {
    let Some(presented) = presented.filter(|token| !token.expose().trim().is_empty()) else {
        return Err(ErrorBody::refused(
            Refusal::TokenMissing,
            "a new node needs a join token (apiary tokens create; APIARY_TOKEN on the node)",
        ));
    };
    let unknown = || ErrorBody::refused(Refusal::TokenUnknown, "unknown join token");
    let token = JoinToken::parse(presented.expose()).map_err(|_| unknown())?;
    let key = topology::token_key(token.id());
    for _ in 0..REDEEM_ATTEMPTS {
        let Some((record, revision)) = read(store, &key).await? else {
            return Err(unknown());
        };
        if !token.matches(&record) {
            return Err(unknown());
        }
        let used = match record.redeem(public_key, now_ms) {
            Ok(None) => return Ok(record.info.id),
            Ok(Some(used)) => used,
            Err(refusal) => {
                let (reason, message) = match refusal {
                    TokenRefusal::Revoked => (Refusal::TokenRevoked, "the join token was revoked"),
                    TokenRefusal::Expired => (Refusal::TokenExpired, "the join token has expired"),
                    TokenRefusal::UsedUp => (Refusal::TokenUsedUp, "the join token is used up"),
                };
                return Err(ErrorBody::refused(reason, message));
            }
        };
        if update(store, &key, &used, revision).await? {
            return Ok(used.info.id);
        }
        // Another node joined with the same token at the same moment: look again, after a
        // pause of a few milliseconds so that a fleet booting together spreads out.
        crate::contention_pause().await;
    }
    Err(internal("redeem the token", "it kept changing"))
}

async fn read(store: &kv::Store, key: &str) -> Result<Option<(TokenRecord, u64)>, ErrorBody> {
    let entry = store
        .entry(key)
        .await
        .map_err(|err| internal("read the token", err))?;
    let Some(entry) = entry.filter(|entry| entry.operation == kv::Operation::Put) else {
        return Ok(None);
    };
    match apiary_proto::Encoding::detect(None, &entry.value).decode(&entry.value) {
        Ok(record) => Ok(Some((record, entry.revision))),
        Err(err) => {
            tracing::warn!(key, error = %err, "skipping a malformed token record");
            Ok(None)
        }
    }
}

/// Stores `record` if the key is still at `revision`; false if someone changed it first.
async fn update(
    store: &kv::Store,
    key: &str,
    record: &TokenRecord,
    revision: u64,
) -> Result<bool, ErrorBody> {
    let value = codec::encode(record).map_err(|err| internal("encode the token", err))?;
    match store.update(key, value, revision).await {
        Ok(_) => Ok(true),
        Err(err) if err.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(false),
        Err(err) => Err(internal("store the token", err)),
    }
}
