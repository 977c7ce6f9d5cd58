//! App messaging (`Client::pubsub`): topics, wildcards, queue groups, requests and durable
//! subscribers against a real server, and namespaces that never hear each other.

use std::collections::BTreeMap;
use std::time::Duration;

use apiary_harness::{PATIENCE, Stack, within};
use apiary_sdk::{PubSubErrorKind, TopicMessage};
use futures::{Stream, StreamExt as _};

/// How long a subscription must stay silent for the wire to count as quiet.
const QUIET: Duration = Duration::from_millis(300);

/// Reads `messages` until nothing has come for [`QUIET`].
async fn until_quiet(
    messages: &mut (impl Stream<Item = TopicMessage> + Unpin),
) -> Vec<TopicMessage> {
    let mut seen = Vec::new();
    while let Ok(Some(message)) = tokio::time::timeout(QUIET, messages.next()).await {
        seen.push(message);
    }
    seen
}

fn payloads(messages: &[TopicMessage]) -> Vec<String> {
    messages
        .iter()
        .map(|message| String::from_utf8_lossy(&message.payload).into_owned())
        .collect()
}

#[tokio::test]
async fn a_subscription_hears_what_another_connection_publishes_right_after_subscribe_returns() {
    let stack = Stack::start().await;
    // The subscriber's bytes reach the server a quarter of a second late, so a subscribe
    // that returned once its request had left the socket (all a flush in async-nats waits
    // for) would miss the publish that follows.
    let (listener, _link) = stack
        .client_over_slow_link(Duration::from_millis(250))
        .await;
    let publisher = stack.client().await;
    let news = listener.pubsub("news").expect("the namespace");
    let mut heard = news.subscribe("today").await.expect("subscribe");
    publisher
        .pubsub("news")
        .expect("the namespace")
        .publish("today", "first")
        .await
        .expect("publish");
    publisher.nats().flush().await.expect("sent");
    let message = within(PATIENCE, "the first message", heard.next())
        .await
        .expect("a message");
    assert_eq!(message.payload, "first");
}

#[tokio::test]
async fn a_wildcard_subscription_hears_its_topics_and_nothing_else() {
    let stack = Stack::start().await;
    let client = stack.client().await;
    let chat = client.pubsub("chat").expect("the namespace");
    let mut rooms = chat.subscribe("rooms.*").await.expect("subscribe");
    let mut everything = chat.subscribe(">").await.expect("subscribe");

    chat.publish("rooms.lobby", "hello").await.expect("publish");
    chat.publish("rooms.lobby.thread", "deeper")
        .await
        .expect("publish");
    chat.publish("direct.ann", "psst").await.expect("publish");

    let heard = until_quiet(&mut rooms).await;
    assert_eq!(payloads(&heard), ["hello"]);
    assert_eq!(heard[0].topic, "rooms.lobby");
    assert_eq!(
        payloads(&until_quiet(&mut everything).await),
        ["hello", "deeper", "psst"]
    );
}

#[tokio::test]
async fn one_namespace_never_hears_anothers_topics() {
    let stack = Stack::start().await;
    let client = stack.client().await;
    let a = client.pubsub("tenant-a").expect("a");
    let b = client.pubsub("tenant-b").expect("b");
    let mut a_all = a.subscribe(">").await.expect("subscribe");

    b.publish("news", "for b only").await.expect("publish");
    a.publish("news", "for a").await.expect("publish");
    assert_eq!(payloads(&until_quiet(&mut a_all).await), ["for a"]);

    // Spellings that would make a subject outside the namespace are refused.
    for topic in [
        "",
        ".",
        "..tenant-b.news",
        "a..b",
        "news.",
        "*",
        ">",
        "a b",
        "news.>",
    ] {
        let err = a.publish(topic, "x").await.expect_err(topic);
        assert_eq!(err.kind(), PubSubErrorKind::InvalidTopic, "{topic:?}");
    }
    for filter in ["", "..", "news.>.x", "ne*", "$SYS.>"] {
        let err = a.subscribe(filter).await.err().expect(filter);
        assert_eq!(err.kind(), PubSubErrorKind::InvalidTopic, "{filter:?}");
    }
    for namespace in ["", "a.b", "*", ">", "a b"] {
        let err = client.pubsub(namespace).expect_err(namespace);
        assert_eq!(
            err.kind(),
            PubSubErrorKind::InvalidNamespace,
            "{namespace:?}"
        );
    }
}

#[tokio::test]
async fn a_queue_group_shares_each_message_with_one_member() {
    let stack = Stack::start().await;
    let client = stack.client().await;
    let jobs = client.pubsub("jobs").expect("the namespace");
    let mut first = jobs
        .queue_subscribe("work", "workers")
        .await
        .expect("member");
    let mut second = jobs
        .queue_subscribe("work", "workers")
        .await
        .expect("member");
    for n in 0..100 {
        jobs.publish("work", format!("job {n}"))
            .await
            .expect("publish");
    }
    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
    let (first_got, second_got) = (
        until_quiet(&mut first).await,
        until_quiet(&mut second).await,
    );
    for payload in payloads(&first_got)
        .into_iter()
        .chain(payloads(&second_got))
    {
        *counts.entry(payload).or_default() += 1;
    }
    assert_eq!(counts.len(), 100, "every job reached one member");
    assert!(
        counts.values().all(|count| *count == 1),
        "no job reached both"
    );
    let err = jobs
        .queue_subscribe("work", "bad group")
        .await
        .err()
        .expect("refused");
    assert_eq!(err.kind(), PubSubErrorKind::InvalidName);
}

#[tokio::test]
async fn a_request_gets_its_answer_and_one_nobody_hears_is_a_typed_error() {
    let stack = Stack::start().await;
    let client = stack.client().await;
    let svc = client.pubsub("svc").expect("the namespace");
    let mut questions = svc.subscribe("echo").await.expect("subscribe");
    let responder = svc.clone();
    tokio::spawn(async move {
        while let Some(question) = questions.next().await {
            let mut answer = b"echo: ".to_vec();
            answer.extend_from_slice(&question.payload);
            responder.respond(&question, answer).await.expect("respond");
        }
    });
    let answer = svc
        .request("echo", "ping", PATIENCE)
        .await
        .expect("an answer");
    assert_eq!(answer.payload, "echo: ping");

    let err = svc
        .request("nobody.home", "ping", PATIENCE)
        .await
        .expect_err("no responders");
    assert_eq!(err.kind(), PubSubErrorKind::NoResponders);

    // A durable subscriber gives the namespace a stream that captures every topic; requests
    // still get the responder's answer, never the stream's publish ack.
    let _durable = svc
        .subscribe_durable("audit.>", "auditor")
        .await
        .expect("a durable subscriber");
    let answer = svc
        .request("echo", "again", PATIENCE)
        .await
        .expect("an answer");
    assert_eq!(answer.payload, "echo: again");
    // The stream now hears every topic, so the server no longer says "no responders": a
    // request nobody answers runs into its timeout instead (documented on
    // `subscribe_durable`).
    let err = svc
        .request("nobody.home", "ping", Duration::from_millis(300))
        .await
        .expect_err("nobody answers");
    assert_eq!(err.kind(), PubSubErrorKind::TimedOut);
}

#[tokio::test]
async fn a_durable_subscriber_gets_what_was_published_while_it_was_away() {
    let stack = Stack::start().await;
    let client = stack.client().await;
    let orders = client.pubsub("orders").expect("the namespace");
    let mut subscriber = orders
        .subscribe_durable("placed.*", "billing")
        .await
        .expect("a durable subscriber");
    orders
        .publish("placed.eu", "order 1")
        .await
        .expect("publish");
    let first = within(PATIENCE, "the first order", subscriber.next())
        .await
        .expect("a message")
        .expect("no error");
    assert_eq!(
        (first.message.topic.as_str(), first.message.payload.as_ref()),
        ("placed.eu", &b"order 1"[..])
    );
    first.ack().await.expect("ack");
    drop(subscriber);

    // Away: two orders, and one on a topic the subscriber does not follow.
    orders
        .publish("placed.us", "order 2")
        .await
        .expect("publish");
    orders
        .publish("cancelled.us", "not billing's")
        .await
        .expect("publish");
    orders
        .publish("placed.eu", "order 3")
        .await
        .expect("publish");

    let mut back = orders
        .subscribe_durable("placed.*", "billing")
        .await
        .expect("the same subscriber again");
    let mut got = Vec::new();
    for _ in 0..2 {
        let message = within(PATIENCE, "an order published while away", back.next())
            .await
            .expect("a message")
            .expect("no error");
        got.push(String::from_utf8_lossy(&message.message.payload).into_owned());
        message.ack().await.expect("ack");
    }
    assert_eq!(
        got,
        ["order 2", "order 3"],
        "order 1 was acknowledged and is not repeated"
    );
    assert!(
        tokio::time::timeout(QUIET, back.next()).await.is_err(),
        "nothing else is delivered"
    );
}
