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
use std::collections::HashMap;
use tokio::sync::oneshot;

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

/// Redemptions of join tokens in this replica, written together.
///
/// Every node of a fleet that boots together presents the same token, and the token's use
/// count is one key: redemptions that each read it and compare-and-set it would mostly lose
/// to each other and retry. Here a redemption joins the queue of its token, and whoever
/// writes next takes the whole queue: one read, every redemption in it applied in turn (a
/// limited token admits until it is used up, and a key it admitted before costs it nothing), and one
/// compare-and-set. Only other replicas' writes still contend.
#[derive(Debug, Default)]
pub(crate) struct Redeemer {
    /// Redemptions not yet written, by token key.
    waiting: std::sync::Mutex<HashMap<String, Vec<Waiting>>>,
    /// Held by the one writing a batch.
    writing: tokio::sync::Mutex<()>,
}

#[derive(Debug)]
struct Waiting {
    token: JoinToken,
    public_key: String,
    answer: oneshot::Sender<Result<String, ErrorBody>>,
}

impl Redeemer {
    /// Admits the new node with `public_key` with `presented`, counting the use (once per
    /// key: a retried registration costs nothing more). Returns the token's id; a refusal
    /// says precisely why.
    pub(crate) async fn redeem(
        &self,
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
        let token = JoinToken::parse(presented.expose()).map_err(|_| unknown())?;
        let key = topology::token_key(token.id());
        let (answer, answered) = oneshot::channel();
        self.waiting()
            .entry(key.clone())
            .or_default()
            .push(Waiting {
                token,
                public_key: public_key.to_owned(),
                answer,
            });
        {
            let _turn = self.writing.lock().await;
            // Empty when an earlier writer took this redemption along with its own.
            let batch = self.waiting().remove(&key).unwrap_or_default();
            if !batch.is_empty() {
                write_batch(store, &key, batch, now_ms).await;
            }
        }
        answered.await.unwrap_or_else(|_| {
            Err(internal(
                "redeem the token",
                "the replica stopped writing it",
            ))
        })
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Waiting>>> {
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Applies `batch` to the token at `key` and answers each redemption in it.
async fn write_batch(store: &kv::Store, key: &str, batch: Vec<Waiting>, now_ms: u64) {
    let outcomes = settle_batch(store, key, &batch, now_ms).await;
    for (waiting, outcome) in batch.into_iter().zip(outcomes) {
        // A registration that gave up waiting has nobody to tell.
        let _ = waiting.answer.send(outcome);
    }
}

async fn settle_batch(
    store: &kv::Store,
    key: &str,
    batch: &[Waiting],
    now_ms: u64,
) -> Vec<Result<String, ErrorBody>> {
    let all = |outcome: Result<String, ErrorBody>| vec![outcome; batch.len()];
    for _ in 0..REDEEM_ATTEMPTS {
        let (record, revision) = match read(store, key).await {
            Ok(Some(found)) => found,
            Ok(None) => return all(Err(unknown())),
            Err(err) => return all(Err(err)),
        };
        let requests = batch
            .iter()
            .map(|waiting| (&waiting.token, waiting.public_key.as_str()));
        let (changed, outcomes) = redeem_all(&record, requests, now_ms);
        let Some(changed) = changed else {
            return outcomes;
        };
        match update(store, key, &changed, revision).await {
            Ok(true) => return outcomes,
            // Another replica redeemed the same token at the same moment: look again,
            // after a pause of a few milliseconds so that replicas spread out.
            Ok(false) => crate::contention_pause().await,
            Err(err) => return all(Err(err)),
        }
    }
    all(Err(internal("redeem the token", "it kept changing")))
}

/// Applies redemptions to `record` in turn: the record to store, if any redemption changed
/// it, and each redemption's outcome (the token's id, or why not).
fn redeem_all<'a>(
    record: &TokenRecord,
    requests: impl IntoIterator<Item = (&'a JoinToken, &'a str)>,
    now_ms: u64,
) -> (Option<TokenRecord>, Vec<Result<String, ErrorBody>>) {
    let mut current = record.clone();
    let mut changed = false;
    let mut outcomes = Vec::new();
    for (token, public_key) in requests {
        if !token.matches(&current) {
            outcomes.push(Err(unknown()));
            continue;
        }
        outcomes.push(match current.redeem(public_key, now_ms) {
            Ok(None) => Ok(current.info.id.clone()),
            Ok(Some(used)) => {
                current = used;
                changed = true;
                Ok(current.info.id.clone())
            }
            Err(refusal) => {
                let (reason, message) = match refusal {
                    TokenRefusal::Revoked => (Refusal::TokenRevoked, "the join token was revoked"),
                    TokenRefusal::Expired => (Refusal::TokenExpired, "the join token has expired"),
                    TokenRefusal::UsedUp => (Refusal::TokenUsedUp, "the join token is used up"),
                };
                Err(ErrorBody::refused(reason, message))
            }
        });
    }
    (changed.then_some(current), outcomes)
}

fn unknown() -> ErrorBody {
    ErrorBody::refused(Refusal::TokenUnknown, "unknown join token")
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

#[cfg(test)]
mod tests {
    use super::*;

    fn token_record(uses_left: Option<u32>) -> (JoinToken, TokenRecord) {
        let token = JoinToken::generate().expect("entropy");
        let record = TokenRecord {
            info: TokenInfo {
                id: token.id().to_owned(),
                description: String::new(),
                created_ms: 0,
                expires_ms: None,
                uses_left,
                uses: 0,
                revoked_ms: None,
            },
            secret_sha256: token.secret_sha256(),
            redeemed_by: Default::default(),
        };
        (token, record)
    }

    #[test]
    fn a_batch_of_redemptions_counts_each_key_once_in_one_record() {
        let (token, record) = token_record(None);
        let requests = [(&token, "NA"), (&token, "NB"), (&token, "NC")];
        let (changed, outcomes) = redeem_all(&record, requests, 1);
        assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
        assert_eq!(changed.expect("the count changed").info.uses, 3);
    }

    #[test]
    fn a_limited_token_admits_a_batch_until_it_is_used_up() {
        let (token, record) = token_record(Some(2));
        let requests = [
            (&token, "NA"),
            (&token, "NA"),
            (&token, "NB"),
            (&token, "NC"),
        ];
        let (changed, outcomes) = redeem_all(&record, requests, 1);
        let changed = changed.expect("the token was used");
        assert_eq!(changed.info.uses_left, Some(0));
        assert_eq!(changed.info.uses, 2);
        assert!(outcomes[..3].iter().all(Result::is_ok), "{outcomes:?}");
        let refused = outcomes[3]
            .as_ref()
            .expect_err("the third key finds it used up");
        assert_eq!(refused.reason, Some(Refusal::TokenUsedUp));
    }

    #[test]
    fn a_wrong_secret_in_a_batch_is_refused_alone() {
        let (token, record) = token_record(None);
        let (other, _) = token_record(None);
        let forged = JoinToken::parse(&format!(
            "{}.{}",
            token.id(),
            other
                .expose()
                .split_once('.')
                .map_or("", |(_, secret)| secret)
        ))
        .expect("a well-formed token");
        let requests = [(&forged, "NA"), (&token, "NB")];
        let (changed, outcomes) = redeem_all(&record, requests, 1);
        assert_eq!(
            outcomes[0].as_ref().expect_err("forged").reason,
            Some(Refusal::TokenUnknown)
        );
        assert!(outcomes[1].is_ok());
        assert_eq!(changed.expect("one use").info.uses, 1);
    }
}
