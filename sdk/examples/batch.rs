//! Run one module over many inputs, at most 16 at a time, printing results as they end.
//!
//! ```sh
//! cargo run -p apiary-sdk --example batch -- wasm-tasks/…/uppercase.wasm one two three
//! ```

use futures::StreamExt as _;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let module_path = args.next().ok_or("usage: batch <module.wasm> <input>...")?;
    let inputs: Vec<String> = args.collect();

    let url = std::env::var("APIARY_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let client = apiary_sdk::Client::connect(&url).await?;
    // Stored once; every task then names it by digest.
    let module = client.modules().put(&std::fs::read(&module_path)?).await?;
    let tasks = inputs
        .iter()
        .map(|input| apiary_sdk::Task::stored(module.clone()).input(input.clone()));
    let mut results = client.submit_batch(tasks.collect::<Vec<_>>(), 16);
    while let Some(item) = results.next().await {
        match item.outcome {
            Ok(output) => println!(
                "{} -> {}",
                inputs[item.index],
                String::from_utf8_lossy(&output.stdout)
            ),
            Err(err) => eprintln!("{} failed: {err}", inputs[item.index]),
        }
    }
    Ok(())
}
