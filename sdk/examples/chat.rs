//! A chat room on app messaging: listens on `rooms.<room>` and sends each line of stdin.
//!
//! ```sh
//! cargo run -p apiary-sdk --example chat -- lobby alice
//! ```

use futures::StreamExt as _;
use tokio::io::AsyncBufReadExt as _;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let room = args.next().unwrap_or_else(|| "lobby".into());
    let name = args.next().unwrap_or_else(|| "someone".into());
    let url = std::env::var("APIARY_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let client = apiary_sdk::Client::connect(&url).await?;
    let chat = client.pubsub("chat")?;
    let topic = format!("rooms.{room}");

    let mut heard = chat.subscribe(&topic).await?;
    tokio::spawn(async move {
        while let Some(message) = heard.next().await {
            println!("{}", String::from_utf8_lossy(&message.payload));
        }
    });
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        chat.publish(&topic, format!("{name}: {line}")).await?;
    }
    Ok(())
}
