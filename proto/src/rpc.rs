//! Request/reply over core NATS with the apiary codec, for both sides.
//!
//! Requesters send MessagePack and read a [`Reply`]; responders decode whichever encoding the
//! request came in and answer in that encoding, with the NATS micro protocol's error headers
//! on refusals so that `nats req` shows them.

use std::time::Duration;

use std::future::Future;

use async_nats::service::endpoint::Endpoint;
use async_nats::{Client, HeaderMap, RequestErrorKind};
use bytes::Bytes;
use futures::StreamExt as _;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec::{self, CodecError, Encoding};
use crate::headers;
use crate::id::NodeId;
use crate::identity::{self, KeyPair};
use crate::message::{ErrorBody, ErrorCode, Reply};
use crate::subject::{self, NodeVerb, Subject};

/// Why a request got no usable answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Nobody listens on the subject: no scheduler (or other responder) is running.
    #[error("nobody answered on {subject}: is {} running?", responder_of(subject))]
    NoResponders { subject: String },
    #[error("no reply on {subject} within {timeout:?}")]
    TimedOut { subject: String, timeout: Duration },
    #[error("request on {subject} failed: {reason}")]
    Transport { subject: String, reason: String },
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The body could not be signed.
    #[error("failed to sign the request: {reason}")]
    Signing { reason: String },
    /// The responder answered with a refusal.
    #[error("request refused: {0}")]
    Refused(ErrorBody),
}

/// Who answers requests on `subject`, for the hint when nobody does: a node's agent for its
/// status, a scheduler replica for everything else.
fn responder_of(subject: &str) -> String {
    match subject::parse_node_subject(subject) {
        Some((node, NodeVerb::Status)) => format!("apiary-agent on node {node}"),
        _ => "apiary-scheduler".to_owned(),
    }
}

/// Sends `request` to `subject` and decodes the [`Reply`].
pub async fn request<Req, Resp>(
    client: &Client,
    subject: Subject,
    request: &Req,
    timeout: Duration,
) -> Result<Resp, RequestError>
where
    Req: Serialize,
    Resp: DeserializeOwned,
{
    let payload = Encoding::MsgPack.encode(request)?;
    request_bytes(client, subject, payload, HeaderMap::new(), timeout).await
}

/// [`request`], with the body signed by a node key ([`crate::identity`]).
pub async fn request_signed<Req, Resp>(
    client: &Client,
    subject: Subject,
    request: &Req,
    key: &KeyPair,
    timeout: Duration,
) -> Result<Resp, RequestError>
where
    Req: Serialize,
    Resp: DeserializeOwned,
{
    let payload = Encoding::MsgPack.encode(request)?;
    let headers = identity::sign(key, &payload).map_err(|err| RequestError::Signing {
        reason: err.to_string(),
    })?;
    request_bytes(client, subject, payload, headers, timeout).await
}

async fn request_bytes<Resp: DeserializeOwned>(
    client: &Client,
    subject: Subject,
    payload: Bytes,
    headers: HeaderMap,
    timeout: Duration,
) -> Result<Resp, RequestError> {
    let name = subject.as_str().to_owned();
    let message = client
        .send_request(
            async_nats::Subject::from(subject),
            async_nats::Request::new()
                .payload(payload)
                .headers(headers)
                .timeout(Some(timeout)),
        )
        .await
        .map_err(|err| match err.kind() {
            RequestErrorKind::NoResponders => RequestError::NoResponders {
                subject: name.clone(),
            },
            RequestErrorKind::TimedOut => RequestError::TimedOut {
                subject: name.clone(),
                timeout,
            },
            _ => RequestError::Transport {
                subject: name.clone(),
                reason: err.to_string(),
            },
        })?;
    let encoding = Encoding::detect(message.headers.as_ref(), &message.payload);
    encoding
        .decode::<Reply<Resp>>(&message.payload)?
        .into_result()
        .map_err(RequestError::Refused)
}

/// The headers and body of a reply, in the request's encoding.
pub fn encode_reply<T: Serialize>(
    encoding: Encoding,
    reply: &Reply<T>,
) -> Result<(HeaderMap, Bytes), CodecError> {
    let body = encoding.encode(reply)?;
    let mut headers = encoding.headers();
    if let Reply::Error(error) = reply {
        headers.insert(headers::SERVICE_ERROR, error.message.as_str());
        headers.insert(
            headers::SERVICE_ERROR_CODE,
            error.code.status().to_string().as_str(),
        );
    }
    Ok((headers, body))
}

/// An encoded reply, or the `too_large` refusal that replaced one the server would not carry.
enum Fitted {
    Reply(HeaderMap, Bytes),
    Refused(ErrorBody, HeaderMap, Bytes),
}

impl Fitted {
    fn into_parts(self) -> (HeaderMap, Bytes) {
        match self {
            Fitted::Reply(headers, body) | Fitted::Refused(_, headers, body) => (headers, body),
        }
    }
}

/// `encoded` if it fits within `max_payload` (0: unknown, as before the first INFO), else a
/// `too_large` refusal in its place, so that the requester learns why instead of waiting
/// out its timeout.
fn fitting(
    encoded: Result<(HeaderMap, Bytes), CodecError>,
    encoding: Encoding,
    max_payload: usize,
    subject: &str,
) -> Result<Fitted, CodecError> {
    let (headers, body) = encoded?;
    if max_payload == 0 || body.len() <= max_payload {
        return Ok(Fitted::Reply(headers, body));
    }
    tracing::warn!(
        subject,
        bytes = body.len(),
        max_payload,
        "a reply too large for the server was refused"
    );
    let error = ErrorBody::new(
        ErrorCode::TooLarge,
        format!(
            "the reply is {} bytes, more than the server's max_payload of {max_payload}; ask for less (a smaller page)",
            body.len()
        ),
    );
    let (headers, body) = encode_reply::<()>(encoding, &Reply::Error(error.clone()))?;
    Ok(Fitted::Refused(error, headers, body))
}

/// A request as it arrived, for handlers that look past the decoded body: the node named in
/// the subject (for `apiary.v1.node.<node>.…` subjects), the headers, and the exact body
/// bytes (what a signature covers).
#[derive(Clone, Debug)]
pub struct Inbound {
    pub subject: String,
    pub node: Option<NodeId>,
    pub headers: Option<HeaderMap>,
    pub payload: Bytes,
}

/// Answers the requests of one micro service endpoint until the endpoint closes: decodes
/// each (MessagePack or JSON), calls `handler` with the node named in the subject, and
/// replies in the request's encoding. A request that cannot be decoded gets a `bad_request`
/// reply, never silence.
pub async fn serve<Req, Resp, H, Fut>(client: async_nats::Client, endpoint: Endpoint, handler: H)
where
    Req: DeserializeOwned,
    Resp: Serialize,
    H: Fn(Option<NodeId>, Req) -> Fut,
    Fut: Future<Output = Reply<Resp>>,
{
    serve_inbound(
        client,
        endpoint,
        |inbound: Inbound, request: Result<Req, CodecError>| {
            let handled = request.map(|request| handler(inbound.node.clone(), request));
            async move {
                Some(match handled {
                    Ok(reply) => reply.await,
                    Err(err) => malformed(&inbound, &err),
                })
            }
        },
    )
    .await
}

/// The `bad_request` reply to a request that could not be decoded, logged.
pub fn malformed<T>(inbound: &Inbound, err: &CodecError) -> Reply<T> {
    tracing::warn!(subject = %inbound.subject, error = %err, "malformed request");
    Reply::Error(ErrorBody::new(ErrorCode::BadRequest, err.to_string()))
}

/// [`serve`] for handlers that see the whole [`Inbound`] request and the outcome of decoding
/// it, and may choose not to answer (`None`): a message that fails its signature check is
/// dropped, not answered, whatever its body holds.
///
/// A refusal is answered with its body (`{"error": …}`, in the request's encoding, with the
/// micro error headers), then once more through the service library's error path, headers
/// only, which is the one way to have `$SRV.STATS` count it in `num_errors` and show it as
/// `last_error`. A requester takes the first answer; the second goes nowhere.
pub async fn serve_inbound<Req, Resp, H, Fut>(
    client: async_nats::Client,
    endpoint: Endpoint,
    handler: H,
) where
    Req: DeserializeOwned,
    Resp: Serialize,
    H: Fn(Inbound, Result<Req, CodecError>) -> Fut,
    Fut: Future<Output = Option<Reply<Resp>>>,
{
    // Requests are answered concurrently: a handler mostly waits on JetStream (a KV put for
    // every heartbeat), and answering one at a time capped a replica at one store round trip
    // per request. The bound keeps a flood from holding unbounded memory; past it the
    // endpoint's subscription buffers, as it did before.
    endpoint
        .for_each_concurrent(MAX_CONCURRENT_REQUESTS, |request| {
            answer(&client, request, &handler)
        })
        .await;
}

/// How many requests one endpoint handles at once.
pub const MAX_CONCURRENT_REQUESTS: usize = 256;

/// Decodes one request, hands it to `handler` and sends its answer, if it has one.
async fn answer<Req, Resp, H, Fut>(
    client: &async_nats::Client,
    request: async_nats::service::Request,
    handler: &H,
) where
    Req: DeserializeOwned,
    Resp: Serialize,
    H: Fn(Inbound, Result<Req, CodecError>) -> Fut,
    Fut: Future<Output = Option<Reply<Resp>>>,
{
    let message = &request.message;
    let node = subject::parse_node_subject(message.subject.as_str()).map(|(node, _)| node);
    let encoding = Encoding::detect(message.headers.as_ref(), &message.payload);
    let decoded = codec::decode_message::<Req>(message.headers.as_ref(), &message.payload)
        .map(|(decoded, _)| decoded);
    let inbound = Inbound {
        subject: message.subject.to_string(),
        node,
        headers: message.headers.clone(),
        payload: message.payload.clone(),
    };
    let Some(reply) = handler(inbound, decoded).await else {
        return;
    };
    let encoded = fitting(
        encode_reply(encoding, &reply),
        encoding,
        client.server_info().max_payload,
        message.subject.as_str(),
    );
    let refusal = match (&reply, &encoded) {
        (Reply::Error(error), _) => Some(async_nats::service::error::Error {
            status: error.message.clone(),
            code: usize::from(error.code.status()),
        }),
        (Reply::Ok(_), Ok(Fitted::Refused(error, ..))) => Some(async_nats::service::error::Error {
            status: error.message.clone(),
            code: usize::from(error.code.status()),
        }),
        (Reply::Ok(_), _) => None,
    };
    let encoded = encoded.map(Fitted::into_parts);
    drop(reply);
    let sent = match encoded {
        Ok((headers, body)) => match (refusal, message.reply.clone()) {
            (Some(refusal), Some(reply_to)) => {
                match client.publish_with_headers(reply_to, headers, body).await {
                    Ok(()) => request.respond(Err(refusal)).await,
                    Err(err) => Err(err),
                }
            }
            _ => request.respond_with_headers(Ok(body), headers).await,
        },
        Err(err) => {
            tracing::error!(error = %err, "failed to encode a reply");
            return;
        }
    };
    if let Err(err) = sent {
        tracing::warn!(error = %err, "failed to send a reply");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::ErrorCode;

    #[test]
    fn nobody_answering_names_who_should_have() {
        let scheduler = RequestError::NoResponders {
            subject: "apiary.v1.nodes.list".into(),
        };
        assert_eq!(
            scheduler.to_string(),
            "nobody answered on apiary.v1.nodes.list: is apiary-scheduler running?"
        );
        let agent = RequestError::NoResponders {
            subject: "apiary.v1.node.pi-1.status".into(),
        };
        assert!(
            agent
                .to_string()
                .ends_with("is apiary-agent on node pi-1 running?")
        );
    }

    #[test]
    fn a_reply_larger_than_the_server_carries_becomes_a_too_large_refusal() {
        let reply: Reply<String> = Reply::Ok("x".repeat(2_000));
        let encoded = encode_reply(Encoding::Json, &reply);
        let Ok(Fitted::Refused(error, headers, body)) =
            fitting(encoded, Encoding::Json, 1_000, "apiary.v1.nodes.list")
        else {
            panic!("a 2 KB reply passed a 1 KB limit");
        };
        assert_eq!(error.code, ErrorCode::TooLarge);
        assert!(body.len() < 1_000);
        assert_eq!(
            headers
                .get(crate::headers::SERVICE_ERROR_CODE)
                .map(|v| v.as_str()),
            Some("413")
        );
        let small = encode_reply(Encoding::Json, &Reply::Ok("x"));
        assert!(matches!(
            fitting(small, Encoding::Json, 1_000, "s"),
            Ok(Fitted::Reply(..))
        ));
    }

    #[test]
    fn refusals_carry_micro_error_headers() {
        let reply: Reply<()> = Reply::Error(ErrorBody::new(ErrorCode::BadRequest, "nope"));
        let (headers, body) = encode_reply(Encoding::Json, &reply).unwrap();
        assert_eq!(
            headers.get(headers::SERVICE_ERROR_CODE).unwrap().as_str(),
            "400"
        );
        assert_eq!(
            headers.get(headers::CONTENT_TYPE).unwrap().as_str(),
            "application/json"
        );
        assert!(body.starts_with(b"{\"error\""));
    }
}
