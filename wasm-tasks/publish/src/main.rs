//! Publishes its input on a topic of its namespace, where SDK subscribers
//! (`client.pubsub(namespace)?.subscribe(topic)`) and `apiary pub sub` receive it, and logs
//! what it did.
//!
//! The topic is the first granted argument (`events` without one). Needs the `publish`
//! grant and a namespace:
//!
//! ```sh
//! apiary sub demo 'alerts.>' &
//! apiary task submit wasm-tasks/target/wasm32-wasip1/release/publish.wasm \
//!     --namespace demo --publish --arg alerts.disk --input 'disk 91% full'
//! apiary task logs <task id>
//! ```

use apiary_guest::{grants, log};

fn main() {
    apiary_guest::run(|input| {
        let topic = grants::args()
            .into_iter()
            .next()
            .unwrap_or_else(|| "events".to_owned());
        apiary_guest::publish(&topic, input)?;
        log::info(&format!("published {} bytes on {topic}", input.len()));
        Ok(format!("published {} bytes on {topic}\n", input.len()))
    });
}
