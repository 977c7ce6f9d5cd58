//! Request/reply over core NATS with the apiary codec, for both sides.
//!
//! Requesters send MessagePack and read a [`Reply`]; responders decode whichever encoding the
//! request came in and answer in that encoding, with the NATS micro protocol's error headers
//! on refusals so that `nats req` shows them.

use std::time::Duration;

use async_nats::{Client, HeaderMap, RequestErrorKind};
use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec::{CodecError, Encoding};
use crate::headers;
use crate::message::{ErrorBody, Reply};
use crate::subject::Subject;

/// Why a request got no usable answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Nobody listens on the subject: no scheduler (or other responder) is running.
    #[error("no responders on {subject}: is the service running?")]
    NoResponders { subject: String },
    #[error("no reply on {subject} within {timeout:?}")]
    TimedOut { subject: String, timeout: Duration },
    #[error("request on {subject} failed: {reason}")]
    Transport { subject: String, reason: String },
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The responder answered with a refusal.
    #[error("request refused: {0}")]
    Refused(ErrorBody),
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
    let name = subject.as_str().to_owned();
    let message = client
        .send_request(
            async_nats::Subject::from(subject),
            async_nats::Request::new()
                .payload(payload)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::ErrorCode;

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
