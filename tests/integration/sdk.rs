//! The SDK's own promises, held against a real server.

use apiary_harness::{PATIENCE, Stack, wasm, within};
use apiary_proto::message::{Outcome, TaskResult};
use apiary_proto::{NodeId, now_ms, stored};
use apiary_sdk::Task;

#[tokio::test]
async fn a_result_stored_while_the_client_was_cut_off_still_reaches_its_handle() {
    // No scheduler runs, so nothing ever publishes this result to the client's inbox: it
    // exists only in APIARY_RESULTS, as a result does when it was published while the client
    // was reconnecting. The reconnect must find it there.
    let stack = Stack::start().await;
    let client = stack.client().await;
    let handle = client
        .submit(Task::new(wasm("uppercase")).input("missed"))
        .await
        .expect("the task is stored");
    let result = TaskResult {
        task_id: handle.id().clone(),
        node_id: NodeId::new("node-a").expect("a valid node id"),
        attempt: 1,
        outcome: Outcome::Completed {
            exit_code: 0,
            stdout: "MISSED".into(),
            stderr: Default::default(),
        },
        started_at_ms: now_ms(),
        finished_at_ms: now_ms(),
        reply_to: None,
        stdout_object: None,
        usage: None,
    };
    let js = async_nats::jetstream::new(stack.nats().await);
    stored::result(&js, &result)
        .await
        .expect("the result is stored");

    client
        .nats()
        .force_reconnect()
        .await
        .expect("the client reconnects");
    let output = within(
        PATIENCE,
        "the handle to resolve after the reconnect",
        handle.result(),
    )
    .await
    .expect("the stored result");
    assert_eq!(output.stdout, "MISSED");
    assert_eq!(client.duplicate_results(), 0);
}

#[tokio::test]
async fn connect_options_authenticate_and_each_failure_has_its_kind() {
    use apiary_broker::{BrokerOptions, NatsServer};
    use apiary_sdk::{ConnectErrorKind, ConnectOptions};
    use std::time::Duration;

    // Users with passwords; a connection without credentials is `anon` (the harness's own
    // readiness check connects that way).
    let server = NatsServer::start(BrokerOptions {
        port: 0,
        config: Some(
            r#"
            jetstream { max_memory_store: 64MB, max_file_store: 256MB }
            accounts {
                APP {
                    jetstream: enabled
                    users: [ {user: app, password: s3cret}, {user: anon, password: unused} ]
                }
            }
            no_auth_user: anon
            "#
            .to_owned(),
        ),
    })
    .await
    .expect("nats-server starts");

    let client = ConnectOptions::new(server.url())
        .user_password("app", "s3cret")
        .name("connect-test")
        .connect()
        .await
        .expect("the right password connects");
    let kv = client.kv("auth").await.expect("and the client works");
    kv.put("k", "v").await.expect("put");

    let err = ConnectOptions::new(server.url())
        .user_password("app", "wrong")
        .connect()
        .await
        .expect_err("a wrong password");
    assert_eq!(err.kind(), ConnectErrorKind::Authentication, "{err}");

    let err = ConnectOptions::new(server.url())
        .credentials_file("/nonexistent/app.creds")
        .connect()
        .await
        .expect_err("a missing creds file");
    assert_eq!(err.kind(), ConnectErrorKind::Credentials, "{err}");
    assert!(
        std::error::Error::source(&err).is_some(),
        "the cause is kept"
    );

    // A port nothing listens on: taken from a listener that is then closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("a free port")
        .local_addr()
        .expect("its address")
        .port();
    let err = ConnectOptions::new(format!("nats://127.0.0.1:{port}"))
        .connection_timeout(Duration::from_millis(500))
        .connect()
        .await
        .expect_err("nobody listens");
    assert_eq!(err.kind(), ConnectErrorKind::Unreachable, "{err}");

    let err = ConnectOptions::new("nats://[not-an-address")
        .connect()
        .await
        .expect_err("an invalid address");
    assert_eq!(err.kind(), ConnectErrorKind::InvalidAddress, "{err}");
}

#[tokio::test]
async fn the_module_store_puts_once_lists_gets_checked_bytes_and_removes() {
    use apiary_sdk::{ModuleErrorKind, module_ref};

    let stack = Stack::start().await;
    let client = stack.client().await;
    let modules = client.modules();
    let bytes = wasm("uppercase");
    let reference = modules.put(&bytes).await.expect("put");
    assert_eq!(reference, modules.put(&bytes).await.expect("put again"));
    let listed = modules.ls().await.expect("ls");
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].sha256.as_str(), listed[0].size),
        (reference.sha256.as_str(), bytes.len() as u64)
    );
    assert_eq!(modules.get(&reference).await.expect("get"), bytes);

    // Other bytes under the module's name, as a botched hand upload leaves them.
    stack
        .put_module_object(&reference.sha256, b"not the module")
        .await;
    assert_eq!(
        modules.get(&reference).await.expect_err("corrupt").kind(),
        ModuleErrorKind::Corrupt
    );

    modules.rm(&reference).await.expect("rm");
    assert!(modules.ls().await.expect("ls").is_empty());
    assert_eq!(
        modules.rm(&reference).await.expect_err("gone").kind(),
        ModuleErrorKind::NotFound
    );
    assert_eq!(
        modules.get(&reference).await.expect_err("gone").kind(),
        ModuleErrorKind::NotFound
    );
    assert_eq!(
        module_ref("not-a-digest").expect_err("invalid").kind(),
        ModuleErrorKind::InvalidDigest
    );
    // A fresh client puts it back (this one remembers it was stored).
    let again = stack.client().await;
    again.modules().put(&bytes).await.expect("put after rm");
    assert_eq!(again.modules().ls().await.expect("ls").len(), 1);
}

#[tokio::test]
async fn a_batch_yields_every_task_once_as_it_ends() {
    use futures::StreamExt as _;

    let (stack, _running) = Stack::with_one_node().await;
    let client = stack.client().await;
    let module = wasm("uppercase");
    let tasks: Vec<Task> = (0..40)
        .map(|n| Task::new(module.clone()).input(format!("item {n}")))
        .collect();
    let items: Vec<_> = within(
        PATIENCE,
        "the whole batch",
        client.submit_batch(tasks, 6).collect::<Vec<_>>(),
    )
    .await;
    let mut seen = [false; 40];
    for item in items {
        assert!(!seen[item.index], "task {} came twice", item.index);
        seen[item.index] = true;
        let output = item.outcome.expect("the task ran");
        assert_eq!(output.stdout, format!("ITEM {}", item.index));
        assert_eq!(Some(&output.task_id), item.id.as_ref());
    }
    assert!(seen.iter().all(|seen| *seen), "every task came back");
}

#[tokio::test]
async fn a_submission_the_server_cannot_take_is_a_typed_error_and_the_client_goes_on() {
    let (stack, _running) = Stack::with_one_node().await;
    let client = stack.client().await;
    let max_payload = client.nats().server_info().max_payload;
    let err = client
        .submit(Task::new(wasm("uppercase")).input(vec![b'x'; max_payload + 1]))
        .await
        .expect_err("an input larger than the server's max_payload");
    assert_eq!(
        err.kind(),
        apiary_sdk::SubmitErrorKind::NotStored,
        "{err:#}"
    );
    // The cause is kept down to the connection's own error, not as text.
    let mut cause = std::error::Error::source(&err);
    let mut from_async_nats = false;
    while let Some(error) = cause {
        from_async_nats |= error
            .downcast_ref::<async_nats::jetstream::context::PublishError>()
            .is_some();
        cause = error.source();
    }
    assert!(from_async_nats, "{err:?}");
    // The client goes on: the next task runs.
    let output = client
        .submit(Task::new(wasm("uppercase")).input("small"))
        .await
        .expect("submit")
        .result_within(PATIENCE)
        .await
        .expect("runs");
    assert_eq!(output.stdout.as_ref(), b"SMALL");
}
