//! App messaging: a namespace's topics ([`Client::pubsub`]), plain and durable.
//!
//! A topic `t` of namespace `ns` is the subject `apiary.v1.app.<ns>.<t>`; topics and filters
//! are checked before they become subjects ([`apiary_proto::app`]), so a subscription with
//! wildcards matches inside its namespace only. Plain subscriptions see what is published
//! while they listen (core NATS, at most once). Durable ones
//! ([`PubSub::subscribe_durable`]) are backed by the namespace's stream,
//! `APIARY_TOPICS_<namespace>`: messages published while the subscriber is away wait for
//! it, and each is delivered until it is acknowledged (at least once).

use std::time::Duration;

use apiary_proto::{Namespace, app, subject, topology};
use async_nats::jetstream::{self, consumer};
use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use futures::{Stream, StreamExt as _};

use crate::Client;
use crate::error::OpError;

/// A messaging operation that failed; [`PubSubError::kind`] says how.
pub type PubSubError = OpError<PubSubErrorKind>;

/// How a messaging operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PubSubErrorKind {
    /// The namespace's name is not an identifier (`[A-Za-z0-9_-]`, at most 64).
    InvalidNamespace,
    /// The topic or filter is not dot-joined tokens of `[A-Za-z0-9_=/-]` (filters may use
    /// `*` tokens and a last `>`).
    InvalidTopic,
    /// A queue group or durable subscriber name is not an identifier.
    InvalidName,
    /// A request found nobody subscribed to its topic.
    NoResponders,
    /// A request had no answer in time.
    TimedOut,
    /// The message is larger than the server takes.
    TooLarge,
    /// The namespace's stream or a durable subscriber could not be set up.
    Durable,
    /// The server or the connection failed the operation.
    Transport,
}

/// A message on a topic of a namespace.
#[derive(Debug, Clone)]
pub struct TopicMessage {
    /// The topic, without the namespace's prefix.
    pub topic: String,
    /// The message's bytes.
    pub payload: Bytes,
    /// The message's headers, if it has any.
    pub headers: Option<HeaderMap>,
    /// Where a request wants its answer ([`PubSub::respond`]); `None` for a plain publish.
    pub reply: Option<Subject>,
}

impl Client {
    /// Opens namespace `namespace` of app messaging. Nothing is made on the server until a
    /// durable subscriber needs the namespace's stream.
    pub fn pubsub(&self, namespace: &str) -> Result<PubSub, PubSubError> {
        let namespace = Namespace::new(namespace).map_err(|err| {
            PubSubError::with_source(PubSubErrorKind::InvalidNamespace, "invalid namespace", err)
        })?;
        Ok(PubSub {
            client: self.nats().clone(),
            namespace,
        })
    }
}

/// A namespace of app messaging. Cheap to clone.
#[derive(Clone, Debug)]
pub struct PubSub {
    client: async_nats::Client,
    namespace: Namespace,
}

fn invalid_topic(err: app::NameError) -> PubSubError {
    PubSubError::with_source(PubSubErrorKind::InvalidTopic, "invalid topic", err)
}

fn invalid_name(err: apiary_proto::IdError) -> PubSubError {
    PubSubError::with_source(PubSubErrorKind::InvalidName, "invalid name", err)
}

fn transport(what: &str, err: impl std::error::Error + Send + Sync + 'static) -> PubSubError {
    PubSubError::with_source(PubSubErrorKind::Transport, format!("failed to {what}"), err)
}

/// Returns once the server has processed everything `nats` sent before the call, such as a
/// subscription: after it, a message anyone publishes reaches that subscription.
///
/// `async_nats::Client::flush` is not enough for that: it only writes the connection's
/// buffer to the socket, and the server may still be reading it when a message from another
/// connection arrives. This makes one request nobody answers, on a fresh inbox subject; the
/// server handles a connection's operations in order, so its "no responders" reply comes
/// after everything before it. It needs permission to publish on the client's inbox prefix
/// (`_INBOX.>` by default), which requests need anyway.
pub async fn round_trip(nats: &async_nats::Client) -> Result<(), PubSubError> {
    match nats.request(nats.new_inbox(), Bytes::new()).await {
        Ok(_) => Ok(()),
        Err(err) => match err.kind() {
            async_nats::RequestErrorKind::NoResponders => Ok(()),
            async_nats::RequestErrorKind::TimedOut => Err(PubSubError::with_source(
                PubSubErrorKind::TimedOut,
                "the server did not answer a round trip in time",
                err,
            )),
            _ => Err(transport("make a round trip to the server", err)),
        },
    }
}

impl PubSub {
    /// The namespace's name.
    pub fn namespace(&self) -> &str {
        self.namespace.as_str()
    }

    /// Publishes `payload` on `topic`.
    pub async fn publish(&self, topic: &str, payload: impl Into<Bytes>) -> Result<(), PubSubError> {
        let subject = self.topic_subject(topic)?;
        let payload = self.fitting(payload.into())?;
        self.client
            .publish(subject, payload)
            .await
            .map_err(|err| transport("publish", err))
    }

    /// Sends `payload` on `topic` and waits up to `timeout` for the first answer.
    pub async fn request(
        &self,
        topic: &str,
        payload: impl Into<Bytes>,
        timeout: Duration,
    ) -> Result<TopicMessage, PubSubError> {
        let subject = self.topic_subject(topic)?;
        let payload = self.fitting(payload.into())?;
        let request = async_nats::Request::new()
            .payload(payload)
            .timeout(Some(timeout));
        let answer = self
            .client
            .send_request(subject, request)
            .await
            .map_err(|err| match err.kind() {
                async_nats::RequestErrorKind::NoResponders => PubSubError::with_source(
                    PubSubErrorKind::NoResponders,
                    format!("nobody answers on topic {topic:?}"),
                    err,
                ),
                async_nats::RequestErrorKind::TimedOut => PubSubError::with_source(
                    PubSubErrorKind::TimedOut,
                    format!("no answer on topic {topic:?} within {timeout:?}"),
                    err,
                ),
                _ => transport("send a request", err),
            })?;
        Ok(TopicMessage {
            topic: topic.to_owned(),
            payload: answer.payload,
            headers: answer.headers,
            reply: None,
        })
    }

    /// Answers a request received on a subscription, on the reply subject the requester
    /// chose. That subject is not checked against the namespace: a requester could name any
    /// subject the responder may publish to, so a responder that must stay inside its
    /// namespace needs server permissions that allow it only `_INBOX.>` (or its clients'
    /// inbox prefix) besides its own topics.
    pub async fn respond(
        &self,
        request: &TopicMessage,
        payload: impl Into<Bytes>,
    ) -> Result<(), PubSubError> {
        let Some(reply) = request.reply.clone() else {
            return Err(PubSubError::new(
                PubSubErrorKind::Transport,
                "the message is not a request: it has no reply subject",
            ));
        };
        let payload = self.fitting(payload.into())?;
        self.client
            .publish(reply, payload)
            .await
            .map_err(|err| transport("answer a request", err))
    }

    /// Every message published on topics matching `filter` from now on (at most once: what
    /// is published while nobody listens is gone). "From now on" holds across connections:
    /// this returns once the server has the subscription ([`round_trip`]), so a message
    /// anyone publishes after it reaches the subscriber.
    pub async fn subscribe(
        &self,
        filter: &str,
    ) -> Result<impl Stream<Item = TopicMessage> + Send + Unpin + use<>, PubSubError> {
        let subject = self.filter_subject(filter)?;
        let subscriber = self
            .client
            .subscribe(subject)
            .await
            .map_err(|err| transport("subscribe", err))?;
        round_trip(&self.client).await?;
        Ok(self.topic_messages(subscriber))
    }

    /// Like [`PubSub::subscribe`], sharing the messages among the subscribers of queue
    /// group `group`: each message goes to one of them.
    pub async fn queue_subscribe(
        &self,
        filter: &str,
        group: &str,
    ) -> Result<impl Stream<Item = TopicMessage> + Send + Unpin + use<>, PubSubError> {
        let subject = self.filter_subject(filter)?;
        let group = apiary_proto::NodeId::new(group).map_err(invalid_name)?;
        let subscriber = self
            .client
            .queue_subscribe(subject, group.to_string())
            .await
            .map_err(|err| transport("subscribe", err))?;
        round_trip(&self.client).await?;
        Ok(self.topic_messages(subscriber))
    }

    /// A durable subscriber named `name` to topics matching `filter`: messages published
    /// while it is away wait for it in the namespace's stream, from the moment it was first
    /// made. Each message is delivered until it is acknowledged
    /// ([`DurableMessage::ack`]), so at least once; one not acknowledged within 30 s comes
    /// again. A later call with the same name picks up where the last one left off (and
    /// moves the subscriber to the new filter if it differs). From the first durable
    /// subscriber on, every message of the namespace is stored (for 24 hours or 128 MiB at
    /// most), and the stream counts as a listener on every topic: a request on a topic
    /// nobody answers then ends in [`PubSubErrorKind::TimedOut`], no longer in
    /// [`PubSubErrorKind::NoResponders`].
    pub async fn subscribe_durable(
        &self,
        filter: &str,
        name: &str,
    ) -> Result<DurableSubscription, PubSubError> {
        let subject = self.filter_subject(filter)?;
        let name = apiary_proto::NodeId::new(name).map_err(invalid_name)?;
        let durable = |what: &str, err: &dyn std::fmt::Display| {
            PubSubError::new(PubSubErrorKind::Durable, format!("failed to {what}: {err}"))
        };
        let js = jetstream::new(self.client.clone());
        let stream = js
            .get_or_create_stream(topology::app_topics_stream(&self.namespace))
            .await
            .map_err(|err| durable("open the namespace's stream", &err))?;
        let consumer: consumer::PullConsumer = stream
            .create_consumer(topology::app_durable_consumer(name.as_str(), subject))
            .await
            .map_err(|err| durable("open the durable subscriber", &err))?;
        let messages = consumer
            .messages()
            .await
            .map_err(|err| durable("start the durable subscriber", &err))?;
        Ok(DurableSubscription {
            namespace: self.namespace.clone(),
            messages,
        })
    }

    fn topic_subject(&self, topic: &str) -> Result<String, PubSubError> {
        app::check_topic(topic).map_err(invalid_topic)?;
        Ok(subject::app_topic(&self.namespace, topic))
    }

    fn filter_subject(&self, filter: &str) -> Result<String, PubSubError> {
        app::check_topic_filter(filter).map_err(invalid_topic)?;
        Ok(subject::app_topic(&self.namespace, filter))
    }

    fn fitting(&self, payload: Bytes) -> Result<Bytes, PubSubError> {
        let max = self.client.server_info().max_payload;
        if payload.len() > max {
            return Err(PubSubError::new(
                PubSubErrorKind::TooLarge,
                format!(
                    "a message of {} bytes is larger than the {max} bytes the server takes",
                    payload.len()
                ),
            ));
        }
        Ok(payload)
    }

    fn topic_messages(
        &self,
        subscriber: async_nats::Subscriber,
    ) -> impl Stream<Item = TopicMessage> + Send + Unpin + use<> {
        let namespace = self.namespace.clone();
        subscriber.filter_map(move |message| {
            let topic =
                subject::parse_app_topic(&namespace, message.subject.as_str()).map(str::to_owned);
            std::future::ready(topic.map(|topic| TopicMessage {
                topic,
                payload: message.payload,
                headers: message.headers,
                reply: message.reply,
            }))
        })
    }
}

/// The messages of a durable subscriber ([`PubSub::subscribe_durable`]).
pub struct DurableSubscription {
    namespace: Namespace,
    messages: consumer::pull::Stream,
}

impl DurableSubscription {
    /// The next message, waiting for one to be published if none is waiting.
    pub async fn next(&mut self) -> Option<Result<DurableMessage, PubSubError>> {
        loop {
            let message = match self.messages.next().await? {
                Ok(message) => message,
                Err(err) => return Some(Err(transport("receive a durable message", err))),
            };
            let Some(topic) = subject::parse_app_topic(&self.namespace, message.subject.as_str())
                .map(str::to_owned)
            else {
                // Not a topic of this namespace: cannot happen with the stream's subjects,
                // and never handed out if it did.
                message.ack().await.ok();
                continue;
            };
            return Some(Ok(DurableMessage {
                message: TopicMessage {
                    topic,
                    payload: message.payload.clone(),
                    headers: message.headers.clone(),
                    reply: None,
                },
                delivery: message,
            }));
        }
    }
}

/// A message of a durable subscriber, delivered until it is acknowledged.
pub struct DurableMessage {
    /// The message.
    pub message: TopicMessage,
    delivery: jetstream::Message,
}

impl DurableMessage {
    /// Marks the message handled: it is not delivered to this subscriber again. Confirmed
    /// by the server before it returns.
    pub async fn ack(&self) -> Result<(), PubSubError> {
        self.delivery.double_ack().await.map_err(|err| {
            PubSubError::new(
                PubSubErrorKind::Transport,
                format!("failed to acknowledge a message: {err}"),
            )
        })
    }

    /// How many times this message has been delivered to this subscriber (1 the first
    /// time).
    pub fn deliveries(&self) -> u64 {
        self.delivery.info().map_or(1, |info| info.delivered as u64)
    }
}

impl std::fmt::Debug for DurableSubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DurableSubscription")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for DurableMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DurableMessage")
            .field("message", &self.message)
            .field("deliveries", &self.deliveries())
            .finish_non_exhaustive()
    }
}
