//! A counter in the app store, incremented safely by many writers with compare-and-swap.
//!
//! ```sh
//! cargo run -p apiary-sdk --example kv_counter -- 10
//! ```

use apiary_sdk::KvErrorKind;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let times: u32 = std::env::args()
        .nth(1)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(10);
    let url = std::env::var("APIARY_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let client = apiary_sdk::Client::connect(&url).await?;
    let kv = client.kv("examples").await?;

    // Four writers at once: each increment reads the value and its revision, and writes
    // only if nobody wrote in between; a conflict means read again and retry.
    let writers: Vec<_> = (0..4)
        .map(|_| {
            let kv = kv.clone();
            tokio::spawn(async move {
                for _ in 0..times {
                    loop {
                        let (count, revision) = match kv.entry("counter").await? {
                            Some(entry) => (
                                std::str::from_utf8(&entry.value)?.parse::<u64>()?,
                                Some(entry.revision),
                            ),
                            None => (0, None),
                        };
                        let next = (count + 1).to_string();
                        let written = match revision {
                            Some(revision) => kv.update("counter", next, revision).await,
                            None => kv.create("counter", next).await,
                        };
                        match written {
                            Ok(_) => break,
                            Err(err)
                                if matches!(
                                    err.kind(),
                                    KvErrorKind::Conflict | KvErrorKind::AlreadyExists
                                ) =>
                            {
                                continue;
                            }
                            Err(err) => {
                                return Err(
                                    Box::new(err) as Box<dyn std::error::Error + Send + Sync>
                                );
                            }
                        }
                    }
                }
                Ok(())
            })
        })
        .collect();
    for writer in writers {
        writer.await?.map_err(|err| err.to_string())?;
    }
    let value = kv.get("counter").await?;
    println!("counter = {}", String::from_utf8_lossy(&value));
    Ok(())
}
