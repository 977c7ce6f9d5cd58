//! The app store (`Client::kv`): every operation against a real server, and namespaces that
//! cannot see each other however keys are spelled.

use std::time::Duration;

use apiary_harness::{PATIENCE, Stack, within};
use apiary_sdk::{KvErrorKind, KvOperation, StoreSettings};
use futures::StreamExt as _;

#[tokio::test]
async fn values_are_put_read_created_swapped_deleted_and_purged() {
    let stack = Stack::start().await;
    let client = stack.client().await;
    let kv = client.kv("shop").await.expect("the namespace opens");

    let first = kv.put("cart.alice", "1 apple").await.expect("put");
    assert_eq!(kv.get("cart.alice").await.expect("get"), "1 apple");
    assert!(kv.exists("cart.alice").await.expect("exists"));
    let entry = kv
        .entry("cart.alice")
        .await
        .expect("entry")
        .expect("a value");
    assert_eq!(entry.revision, first);

    // Create only if absent.
    let created = kv.create("cart.bob", "1 pear").await.expect("create");
    let err = kv
        .create("cart.bob", "2 pears")
        .await
        .expect_err("the key exists");
    assert_eq!(err.kind(), KvErrorKind::AlreadyExists);
    assert_eq!(kv.get("cart.bob").await.expect("get"), "1 pear");

    // Compare-and-swap on the revision.
    let swapped = kv
        .update("cart.bob", "2 pears", created)
        .await
        .expect("update at the latest revision");
    let err = kv
        .update("cart.bob", "3 pears", created)
        .await
        .expect_err("a stale revision");
    assert_eq!(err.kind(), KvErrorKind::Conflict);
    assert!(swapped > created);
    assert_eq!(kv.get("cart.bob").await.expect("get"), "2 pears");

    // Delete, then purge.
    kv.delete("cart.alice").await.expect("delete");
    assert_eq!(
        kv.get("cart.alice").await.expect_err("deleted").kind(),
        KvErrorKind::NotFound
    );
    assert!(!kv.exists("cart.alice").await.expect("exists"));
    kv.purge("cart.bob").await.expect("purge");
    assert!(kv.entry("cart.bob").await.expect("entry").is_none());
    assert_eq!(
        kv.get("never.written").await.expect_err("missing").kind(),
        KvErrorKind::NotFound
    );
    assert!(kv.keys("").await.expect("keys").is_empty());
}

#[tokio::test]
async fn typed_values_round_trip_as_json_and_messagepack() {
    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Counter {
        name: String,
        count: u64,
    }
    let stack = Stack::start().await;
    let client = stack.client().await;
    let kv = client.kv("typed").await.expect("the namespace opens");
    let counter = Counter {
        name: "visits".into(),
        count: 41,
    };
    kv.put_json("json", &counter).await.expect("put json");
    assert_eq!(
        kv.get("json").await.expect("raw"),
        r#"{"name":"visits","count":41}"#
    );
    assert_eq!(kv.get_json::<Counter>("json").await.expect("json"), counter);
    kv.put_msgpack("msgpack", &counter)
        .await
        .expect("put msgpack");
    assert_eq!(
        kv.get_msgpack::<Counter>("msgpack").await.expect("msgpack"),
        counter
    );
    let err = kv
        .get_json::<Counter>("msgpack")
        .await
        .expect_err("MessagePack is not JSON");
    assert_eq!(err.kind(), KvErrorKind::Codec);
}

#[tokio::test]
async fn keys_list_by_prefix_in_pages_and_history_keeps_the_namespace_depth() {
    let stack = Stack::start().await;
    let client = stack.client().await;
    let settings = StoreSettings {
        history: 3,
        ..StoreSettings::default()
    };
    let kv = client
        .create_kv("paged", &settings)
        .await
        .expect("the namespace is created");
    for n in 0..7 {
        kv.put(&format!("users.u{n}"), format!("user {n}"))
            .await
            .expect("put");
    }
    kv.put("usersx", "not under users.").await.expect("put");
    kv.put("groups.g1", "group").await.expect("put");
    kv.delete("users.u3").await.expect("delete");

    let users = kv.keys("users.").await.expect("keys");
    assert_eq!(
        users,
        [
            "users.u0", "users.u1", "users.u2", "users.u4", "users.u5", "users.u6"
        ]
    );
    assert_eq!(
        kv.keys("users").await.expect("keys").len(),
        7,
        "a prefix part-way into a token matches by string"
    );
    assert_eq!(kv.keys("").await.expect("keys").len(), 8);
    assert!(kv.keys("nobody.").await.expect("keys").is_empty());

    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = kv
            .list("users.", 4, after.as_deref())
            .await
            .expect("a page");
        pages += 1;
        seen.extend(page.entries.iter().map(|entry| entry.key.clone()));
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(pages, 2);
    assert_eq!(seen, users);

    for value in ["a", "b", "c", "d"] {
        kv.put("config", value).await.expect("put");
    }
    let history = kv.history("config").await.expect("history");
    let values: Vec<_> = history.iter().map(|entry| entry.value.clone()).collect();
    assert_eq!(values, ["b", "c", "d"], "the namespace keeps three values");
}

#[tokio::test]
async fn a_watch_sees_changes_under_its_prefix_only() {
    let stack = Stack::start().await;
    let client = stack.client().await;
    let kv = client.kv("watched").await.expect("the namespace opens");
    let mut changes = kv.watch("sensors.").await.expect("watch");
    kv.put("other.x", "ignored").await.expect("put");
    kv.put("sensors.t1", "21.5").await.expect("put");
    kv.delete("sensors.t1").await.expect("delete");
    let first = within(PATIENCE, "the first change", changes.next())
        .await
        .expect("a change")
        .expect("no error");
    assert_eq!(
        (first.key.as_str(), first.value.as_ref(), first.operation),
        ("sensors.t1", &b"21.5"[..], KvOperation::Put)
    );
    let second = within(PATIENCE, "the delete", changes.next())
        .await
        .expect("a change")
        .expect("no error");
    assert_eq!(second.operation, KvOperation::Delete);
}

#[tokio::test]
async fn invalid_keys_and_namespaces_and_large_values_are_typed_errors() {
    let stack = Stack::start().await;
    let client = stack.client().await;
    for namespace in ["", "a.b", "a*", "a>", "a b", "../etc"] {
        let err = client.kv(namespace).await.expect_err(namespace);
        assert_eq!(err.kind(), KvErrorKind::InvalidNamespace, "{namespace:?}");
    }
    let settings = StoreSettings {
        max_value_size: Some(1024),
        ..StoreSettings::default()
    };
    let kv = client.create_kv("small", &settings).await.expect("created");
    for key in [
        "", ".", "a.", ".a", "a..b", "*", ">", "a.*", "a.>", "a b", "$KV.x",
    ] {
        let err = kv.put(key, "v").await.expect_err(key);
        assert_eq!(err.kind(), KvErrorKind::InvalidKey, "{key:?}");
        assert_eq!(
            kv.get(key).await.expect_err(key).kind(),
            KvErrorKind::InvalidKey
        );
    }
    let err = kv
        .put("big", vec![0u8; 1025])
        .await
        .expect_err("over the namespace's max value size");
    assert_eq!(err.kind(), KvErrorKind::TooLarge);
    kv.put("fits", vec![0u8; 1024]).await.expect("at the limit");
}

#[tokio::test]
async fn one_namespace_cannot_read_list_or_watch_anothers_keys() {
    let stack = Stack::start().await;
    let client = stack.client().await;
    let a = client.kv("tenant-a").await.expect("a");
    let b = client.kv("tenant-b").await.expect("b");
    b.put("secret", "b's").await.expect("put");
    b.put("shared.name", "b's").await.expect("put");
    let mut a_watch = a.watch("").await.expect("watch");

    assert_eq!(
        a.get("secret").await.expect_err("not a's").kind(),
        KvErrorKind::NotFound
    );
    assert!(a.keys("").await.expect("keys").is_empty());
    // Spellings that would reach b's bucket if they became subjects are refused.
    for key in [
        "..tenant-b.secret",
        "*",
        ">",
        "$KV.APIARY_KV_tenant-b.secret",
        "APIARY_KV_tenant-b.>",
    ] {
        assert!(a.get(key).await.is_err(), "{key:?}");
        assert!(a.keys(key).await.is_err(), "{key:?}");
        assert!(a.watch(key).await.is_err(), "{key:?}");
    }
    // A write to b never reaches a's watch: a's own write is the first thing it sees.
    b.put("shared.name", "b's again").await.expect("put");
    a.put("mine", "a's").await.expect("put");
    let seen = within(PATIENCE, "a's own change", a_watch.next())
        .await
        .expect("a change")
        .expect("no error");
    assert_eq!(seen.key, "mine");
    assert!(
        tokio::time::timeout(Duration::from_millis(200), a_watch.next())
            .await
            .is_err(),
        "nothing else reaches a's watch"
    );
}
