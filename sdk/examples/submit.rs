//! Submit one task and await its result.
//!
//! ```sh
//! cargo run -p apiary-sdk --example submit -- wasm-tasks/…/uppercase.wasm "hello"
//! ```
//! The cluster is at `APIARY_NATS_URL` (default `nats://127.0.0.1:4222`).

use std::time::Duration;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let module_path = args.next().ok_or("usage: submit <module.wasm> [input]")?;
    let input = args.next().unwrap_or_default();

    let url = std::env::var("APIARY_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let client = apiary_sdk::Client::connect(&url).await?;
    let module = std::fs::read(&module_path)?;
    let task = apiary_sdk::Task::new(module)
        .input(input)
        .timeout(Duration::from_secs(10));
    let handle = client.submit(task).await?;
    println!("submitted task {}", handle.id());
    match handle.result().await {
        Ok(output) => println!("{}", String::from_utf8_lossy(&output.stdout)),
        // A task that could not run says why, with a kind to match on.
        Err(err) => match err.task_error_kind() {
            Some(kind) => eprintln!("the task failed ({kind}): {err}"),
            None => return Err(err.into()),
        },
    }
    Ok(())
}
